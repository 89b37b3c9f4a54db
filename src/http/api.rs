//! The endpoints of the push and admin API (PROTOCOL.md section 5).

use super::{Request, Response};
use crate::shard::{PlayerInfo, ShardCtx, ShardMsg};
use std::rc::Rc;
use std::time::Duration;

/// How long a request waits for another shard's answer.
const SHARD_REPLY: Duration = Duration::from_secs(5);

/// Answer one request on shard `ctx`.
pub async fn handle(ctx: Rc<ShardCtx>, req: Request) -> Response {
    let path = req.path.as_str();
    if path == "/healthz" {
        return match req.method.as_str() {
            "GET" => Response::json(200, "{\"status\":\"ok\"}".into()),
            _ => Response::error(405, "use GET"),
        };
    }
    if let Some(id) = path.strip_prefix("/v1/players/") {
        if req.method != "GET" {
            return Response::error(405, "use GET");
        }
        let Some(player) = id.parse::<u64>().ok().filter(|&p| p > 0) else {
            return Response::error(400, "player id must be a positive integer");
        };
        return match player_info(&ctx, player).await {
            Ok(Some(info)) => Response::json(200, player_json(&info)),
            Ok(None) => Response::error(404, "no such player on this gateway"),
            Err(resp) => resp,
        };
    }
    Response::error(404, "no such endpoint")
}

/// Ask the player's home shard (this one or another) for its state.
async fn player_info(ctx: &ShardCtx, player: u64) -> Result<Option<PlayerInfo>, Response> {
    let home = shards::home_shard(player, ctx.count);
    if home == ctx.id {
        return Ok(ctx.player_info(player));
    }
    let (tx, rx) = flume::bounded(1);
    if ctx
        .mesh
        .send(home, ShardMsg::PlayerInfo { player, reply: tx })
        .is_err()
    {
        return Err(Response::error(503, "the player's shard is stopping"));
    }
    let answer = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(SHARD_REPLY).await;
        None
    })
    .await;
    answer.ok_or_else(|| Response::error(503, "the player's shard did not answer"))
}

fn player_json(p: &PlayerInfo) -> String {
    format!(
        "{{\"player\":{},\"online\":{},\"seq\":{},\"acked\":{},\"outbox\":{},\"outbox_bytes\":{},\"evictions\":{},\"shard\":{}}}",
        p.player, p.online, p.seq, p.acked, p.outbox, p.outbox_bytes, p.evictions, p.shard
    )
}
