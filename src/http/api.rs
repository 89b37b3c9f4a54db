//! The endpoints of the push and admin API (PROTOCOL.md section 5, and the
//! additions in docs/PROTOCOL.md).
//!
//! A request lands on any shard. What concerns players is split by home
//! shard and sent over the mesh; the handler awaits the answers holding no
//! shard state, so a shard is never blocked by another.
//!
//! Why one file of this length: one handler per endpoint of the push/admin
//! API (PROTOCOL.md section 5 and docs/PROTOCOL.md), each short, listed in
//! the order of the table they implement.

use super::params;
use super::{Request, Response};
use crate::metrics::Snapshot;
use crate::shard::{GatewayEvent, PlayerInfo, PushCounts, ShardCtx, ShardMsg};
use bytes::Bytes;
use std::rc::Rc;
use std::time::Duration;

/// How long a request waits for another shard's answer.
const SHARD_REPLY: Duration = Duration::from_secs(10);
pub use params::MAX_PAGE;

/// Answer one request on shard `ctx` (the connection loop counts it).
pub async fn handle(ctx: Rc<ShardCtx>, req: Request) -> Response {
    route(&ctx, req).await
}

async fn route(ctx: &ShardCtx, req: Request) -> Response {
    let cfg = ctx.cfg();
    if let Some(refused) =
        params::check_token(cfg.push_token.as_deref(), cfg.admin_token.as_deref(), &req)
    {
        return refused;
    }
    let method = req.method.as_str();
    // (The shards hear of an upgrade once the new process runs: from
    // then on, until this process ends or the upgrade is abandoned.)
    let handed = ctx.http_quit.is_open();
    let upgrading = handed || ctx.upgrade_to.borrow().is_some();
    match req.path.as_str() {
        // While a live upgrade moves the players (or once it has), what
        // would need all of them in one place waits for the new process.
        "/v1/broadcast" | "/v1/evacuate" | "/v1/migrate" | "/v1/drain" if upgrading => {
            Response::error(503, super::REFUSED_UPGRADING)
        }
        // This process has handed everything over and forwards nothing
        // more: nothing was pushed, the new process takes it.
        "/v1/push" if handed && ctx.upgrade_to.borrow().is_none() => {
            Response::error(503, super::REFUSED_UPGRADING)
        }
        "/healthz" => match method {
            "GET"
                if ctx.is_draining()
                    || ctx.cluster.as_ref().is_some_and(|c| {
                        c.load.draining.load(std::sync::atomic::Ordering::Acquire)
                    }) =>
            {
                Response::json(503, "{\"status\":\"draining\"}".into())
            }
            "GET" => Response::json(200, "{\"status\":\"ok\"}".into()),
            _ => Response::error(405, "use GET"),
        },
        "/v1/evacuate" => match method {
            "POST" => evacuate(ctx, &req).await,
            _ => Response::error(405, "use POST"),
        },
        "/v1/evacuation" => match method {
            "GET" => evacuation(ctx, false).await,
            "DELETE" => evacuation(ctx, true).await,
            _ => Response::error(405, "use GET, or DELETE to cancel"),
        },
        "/v1/migrate" => match method {
            "POST" => migrate(ctx, &req).await,
            _ => Response::error(405, "use POST"),
        },
        "/v1/upgrade" => match method {
            "POST" => upgrade(ctx, &req).await,
            _ => Response::error(405, "use POST"),
        },
        "/v1/reload" => match method {
            "POST" => reload(ctx).await,
            _ => Response::error(405, "use POST"),
        },
        "/v1/drain" => match method {
            "POST" => {
                let evacuate = match req.param("evacuate") {
                    None | Some("false") | Some("0") => false,
                    Some("true") | Some("1") => true,
                    Some(_) => return Response::error(400, "evacuate must be true or false"),
                };
                if evacuate && ctx.cluster.is_none() {
                    return Response::error(409, "this gateway is not in a cluster");
                }
                match &ctx.events {
                    Some(events)
                        if events
                            .send(GatewayEvent::DrainRequested { evacuate })
                            .is_ok() =>
                    {
                        Response::json(
                            202,
                            format!("{{\"draining\":true,\"evacuate\":{evacuate}}}"),
                        )
                    }
                    _ => Response::error(503, "no coordinator to drain this gateway"),
                }
            }
            _ => Response::error(405, "use POST"),
        },
        "/metrics" => match method {
            "GET" => metrics(ctx).await,
            _ => Response::error(405, "use GET"),
        },
        // A backend's push goes to another gateway; one forwarded by a
        // peer (which chose this gateway from the directory a moment ago)
        // is still served: its players are delivered here or routed on.
        "/v1/push" | "/v1/broadcast" if ctx.is_draining() && req.param("hops").is_none() => {
            Response::error(503, super::PUSH_REFUSED_DRAINING)
        }
        "/v1/push" => match method {
            "POST" => push(ctx, &req).await,
            _ => Response::error(405, "use POST"),
        },
        "/v1/broadcast" => match method {
            "POST" => broadcast(ctx, &req).await,
            _ => Response::error(405, "use POST"),
        },
        "/v1/kick" => match method {
            "POST" => kick(ctx, &req).await,
            _ => Response::error(405, "use POST"),
        },
        "/v1/players" => match method {
            "GET" => list_players(ctx, &req).await,
            _ => Response::error(405, "use GET"),
        },
        path => match path.strip_prefix("/v1/players/") {
            Some(id) if method == "GET" => match params::player(id) {
                Some(player) => match player_info(ctx, player).await {
                    Ok(Some(info)) => Response::json(200, player_json(&info)),
                    Ok(None) => Response::error(404, "no such player on this gateway"),
                    Err(resp) => resp,
                },
                None => Response::error(400, "player id must be a positive integer"),
            },
            Some(_) => Response::error(405, "use GET"),
            None => Response::error(404, "no such endpoint"),
        },
    }
}

/// Send `msg` to shard `to` and await its reply; `local` serves this shard.
async fn ask<T: Send + 'static>(
    ctx: &ShardCtx,
    to: usize,
    local: impl FnOnce() -> T,
    msg: impl FnOnce(flume::Sender<T>) -> ShardMsg,
) -> Result<T, Response> {
    if to == ctx.id {
        return Ok(local());
    }
    let (tx, rx) = flume::bounded(1);
    if ctx.mesh.send(to, msg(tx)).is_err() {
        return Err(Response::error(503, "a shard is stopping"));
    }
    futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(SHARD_REPLY).await;
        None
    })
    .await
    .ok_or_else(|| Response::error(503, "a shard did not answer in time"))
}

/// Ask every shard (this one locally); answers in shard order.
async fn ask_all<T: Send + 'static>(
    ctx: &ShardCtx,
    local: impl Fn() -> T,
    msg: impl Fn(flume::Sender<T>) -> ShardMsg,
) -> Result<Vec<T>, Response> {
    // Send to every peer first, then collect: the shards work in parallel.
    let mut waiting = Vec::with_capacity(ctx.count);
    for to in 0..ctx.count {
        if to == ctx.id {
            waiting.push(None);
            continue;
        }
        let (tx, rx) = flume::bounded(1);
        if ctx.mesh.send(to, msg(tx)).is_err() {
            return Err(Response::error(503, "a shard is stopping"));
        }
        waiting.push(Some(rx));
    }
    let mut out = Vec::with_capacity(ctx.count);
    for w in waiting {
        match w {
            None => out.push(local()),
            Some(rx) => {
                let got = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
                    glommio::timer::sleep(SHARD_REPLY).await;
                    None
                })
                .await;
                out.push(
                    got.ok_or_else(|| Response::error(503, "a shard did not answer in time"))?,
                );
            }
        }
    }
    Ok(out)
}

fn counts_json(c: &PushCounts) -> String {
    format!(
        "{{\"delivered\":{},\"cached\":{},\"offline\":{}}}",
        c.delivered, c.cached, c.offline
    )
}

/// `POST /v1/push?players=1,2,3&msg=2001`
async fn push(ctx: &ShardCtx, req: &Request) -> Response {
    let msg_id = match params::msg(req) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let players = match params::players(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); ctx.count];
    for player in players {
        by_shard[shards::home_shard(player, ctx.count)].push(player);
    }
    // Everything is validated: from here on, frames get their seqs.
    let body = req.body.clone();
    let mut total = match push_here(ctx, by_shard, msg_id, &body).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    // A live upgrade: players already in the new process get it there.
    if !total.away_players.is_empty() {
        let away = std::mem::take(&mut total.away_players);
        total.add(forward_to_new(ctx, away, msg_id, &body).await);
    }
    // In a cluster, players this gateway does not hold may be held by
    // another: the push goes there, and its counts join ours.
    if let Some(cluster) = &ctx.cluster {
        if !total.offline_players.is_empty() {
            let players = std::mem::take(&mut total.offline_players);
            // A forwarded push carries `hops`: it may chase a player that
            // moved on (a migration) a few times, never loop; `local=1`
            // keeps it here.
            let hops: u32 = match req.param("local") {
                Some("1") => MAX_HOPS,
                _ => req.param("hops").and_then(super::digits).unwrap_or(0),
            };
            match push_elsewhere(ctx, cluster, players, msg_id, &body, hops).await {
                Ok(remote) => {
                    let moved = remote.delivered + remote.cached;
                    total.delivered += remote.delivered;
                    total.cached += remote.cached;
                    total.offline = total.offline.saturating_sub(moved);
                }
                // Local frames already have their seqs: answering an error
                // now would invite a retry that doubles them. The players
                // we could not reach stay counted offline.
                Err(r) => tracing::warn!(
                    status = r.status,
                    "push: cluster unreachable; players not held here counted offline"
                ),
            }
        }
    }
    Response::json(200, counts_json(&total))
}

/// A push for players a live upgrade moved to the new process: through
/// this process's coordinator, which forwards it over the channel. What
/// cannot reach them is counted offline (the frames of the others have
/// their seqs already).
async fn forward_to_new(
    ctx: &ShardCtx,
    players: Vec<u64>,
    msg_id: u32,
    body: &Bytes,
) -> PushCounts {
    let n = players.len() as u64;
    let offline = PushCounts {
        offline: n,
        ..Default::default()
    };
    let Some(to) = ctx.upgrade_to.borrow().clone() else {
        tracing::warn!(
            players = n,
            "push: players handed to a new process; nothing forwards"
        );
        return offline;
    };
    let (reply, rx) = flume::bounded(1);
    let f = crate::upgrade::Forward {
        players,
        msg_id,
        body: body.clone(),
        reply: Some(reply),
    };
    if to.send(crate::upgrade::Event::Forward(f)).is_err() {
        return offline;
    }
    futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(SHARD_REPLY).await;
        None
    })
    .await
    .unwrap_or(offline)
}

/// One PUSH to each of the players in `by_shard` (by home shard) held on
/// this gateway; players not held are counted offline and listed.
async fn push_here(
    ctx: &ShardCtx,
    by_shard: Vec<Vec<u64>>,
    msg_id: u32,
    body: &Bytes,
) -> Result<PushCounts, Response> {
    let mut waiting = Vec::new();
    let mut total = PushCounts::default();
    for (to, players) in by_shard.into_iter().enumerate() {
        if players.is_empty() {
            continue;
        }
        if to == ctx.id {
            total.add(ctx.push(&players, msg_id, body));
            continue;
        }
        let (tx, rx) = flume::bounded(1);
        let m = ShardMsg::Push {
            players,
            msg_id,
            body: body.clone(),
            reply: tx,
        };
        if ctx.mesh.send(to, m).is_err() {
            return Err(Response::error(503, "a shard is stopping"));
        }
        waiting.push(rx);
    }
    for rx in waiting {
        let got = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
            glommio::timer::sleep(SHARD_REPLY).await;
            None
        })
        .await;
        match got {
            Some(Some(c)) => total.add(c),
            Some(None) => {
                return Err(Response::error(
                    503,
                    "the gateway is draining; some players may have the push",
                ))
            }
            None => {
                return Err(Response::error(
                    503,
                    "a shard did not answer in time; some players may have the push",
                ))
            }
        }
    }
    Ok(total)
}

/// How many times a push may be forwarded between gateways (it chases a
/// player that is migrating).
const MAX_HOPS: u32 = 3;

/// Ask the cluster's control thread; the answer or a 503.
async fn ask_cluster<T: Send + 'static>(
    cluster: &crate::cluster::runtime::ClusterHandle,
    make: impl FnOnce(flume::Sender<Result<T, String>>) -> crate::cluster::runtime::Cmd,
) -> Result<T, Response> {
    let (tx, rx) = flume::bounded(1);
    if cluster.cmds.send(make(tx)).is_err() {
        return Err(Response::error(503, "the cluster is stopped"));
    }
    futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(SHARD_REPLY).await;
        None
    })
    .await
    .unwrap_or_else(|| Err("the cluster did not answer in time".into()))
    .map_err(|e| Response::error(503, &format!("cluster: {e}")))
}

/// Forward `path` to every gateway in `targets` (HTTP address, path, the
/// players it names); the sum of the counts of those that answered, and
/// the players of the forwards that surely delivered nothing (the peer
/// could not be reached, or answered 503: it stopped or drains), which may
/// be routed again.
async fn forward_all(
    ctx: &ShardCtx,
    cluster: &crate::cluster::runtime::ClusterHandle,
    targets: Vec<(String, String, Vec<u64>)>,
    body: &Bytes,
) -> Result<(PushCounts, Vec<u64>), Response> {
    use crate::cluster::runtime::Cmd;
    let token = ctx.cfg().push_token.clone();
    let mut waiting = Vec::new();
    for (http, path, players) in targets {
        let (tx, rx) = flume::bounded(1);
        let cmd = Cmd::Forward {
            http: http.clone(),
            path,
            body: body.clone(),
            token: token.clone(),
            reply: tx,
        };
        if cluster.cmds.send(cmd).is_err() {
            return Err(Response::error(503, "the cluster is stopped"));
        }
        waiting.push((http, players, rx));
    }
    let mut total = PushCounts::default();
    let mut again = Vec::new();
    for (http, players, rx) in waiting {
        let got = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
            glommio::timer::sleep(SHARD_REPLY).await;
            None
        })
        .await;
        // A peer that failed counts nothing: its players stay offline in
        // the answer, and what the others delivered still counts (an
        // error now would invite a retry that doubles their frames).
        match got {
            Some(Ok(c)) => total.add(c),
            Some(Err(e)) if e.delivered_nothing => {
                tracing::debug!(peer = http, error = %e, "push: another gateway took nothing; routing again");
                again.extend(players);
            }
            Some(Err(e)) => tracing::warn!(peer = http, error = %e, "push: another gateway failed"),
            None => tracing::warn!(peer = http, "push: another gateway did not answer in time"),
        }
    }
    Ok((total, again))
}

/// How many times a push routes again the players whose gateway took
/// nothing (it stopped or drains while they moved on), and the pause
/// before each.
const REROUTES: usize = 5;
const REROUTE_PAUSE: Duration = Duration::from_millis(100);

async fn push_elsewhere(
    ctx: &ShardCtx,
    cluster: &crate::cluster::runtime::ClusterHandle,
    mut players: Vec<u64>,
    msg_id: u32,
    body: &Bytes,
    hops: u32,
) -> Result<PushCounts, Response> {
    let mut total = PushCounts::default();
    for round in 0..=REROUTES {
        if round > 0 {
            glommio::timer::sleep(REROUTE_PAUSE).await;
        }
        let routed = ask_cluster(cluster, |reply| crate::cluster::runtime::Cmd::Route {
            players: std::mem::take(&mut players),
            reply,
        })
        .await?;
        // Guessed (Redis failing over): every peer gets every player, and
        // forwards no further.
        let next_hops = if routed.guessed { MAX_HOPS } else { hops + 1 };
        // The directory may already name this gateway for a player whose
        // state is still on its way here (a migration): wait for it a moment.
        let (mine, others): (Vec<_>, Vec<_>) = routed
            .routes
            .into_iter()
            .partition(|(http, _)| http.is_empty());
        let mut arriving: Vec<u64> = mine.into_iter().flat_map(|(_, ps)| ps).collect();
        for _ in 0..40 {
            if arriving.is_empty() {
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); ctx.count];
            for p in arriving.drain(..) {
                by_shard[shards::home_shard(p, ctx.count)].push(p);
            }
            let got = push_here(ctx, by_shard, msg_id, body).await?;
            total.delivered += got.delivered;
            total.cached += got.cached;
            arriving = got.offline_players;
        }
        if hops >= MAX_HOPS {
            break;
        }
        let targets = others
            .into_iter()
            .map(|(http, ps)| {
                let list: Vec<String> = ps.iter().map(u64::to_string).collect();
                let path = format!(
                    "/v1/push?players={}&msg={msg_id}&hops={next_hops}",
                    list.join(","),
                );
                (http, path, ps)
            })
            .collect();
        let (got, again) = forward_all(ctx, cluster, targets, body).await?;
        total.add(got);
        if again.is_empty() || routed.guessed {
            break;
        }
        players = again;
    }
    Ok(total)
}

/// `POST /v1/broadcast?msg=2001`
async fn broadcast(ctx: &ShardCtx, req: &Request) -> Response {
    let msg_id = match params::msg(req) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let body: Bytes = req.body.clone();
    let counts = ask_all(
        ctx,
        || Some(ctx.broadcast(msg_id, &body)),
        |reply| ShardMsg::Broadcast {
            msg_id,
            body: body.clone(),
            reply,
        },
    )
    .await;
    match counts {
        Ok(all) => {
            let mut total = PushCounts::default();
            for c in all {
                match c {
                    Some(c) => total.add(c),
                    None => {
                        return Response::error(
                            503,
                            "the gateway is draining; some players may have the push",
                        )
                    }
                }
            }
            if let Some(cluster) = &ctx.cluster {
                if req.param("local") != Some("1") {
                    // The local players have it already: whatever fails
                    // from here on is logged, never answered as an error
                    // (a retry would send them the frame twice).
                    let path = format!("/v1/broadcast?msg={msg_id}&local=1");
                    let remote = match ask_cluster(cluster, |reply| {
                        crate::cluster::runtime::Cmd::Peers { reply }
                    })
                    .await
                    {
                        Ok(peers) => {
                            let targets = peers
                                .into_iter()
                                .map(|h| (h, path.clone(), Vec::new()))
                                .collect();
                            forward_all(ctx, cluster, targets, &body)
                                .await
                                .map(|(counts, _)| counts)
                        }
                        Err(r) => Err(r),
                    };
                    match remote {
                        Ok(remote) => total.add(remote),
                        Err(r) => tracing::warn!(
                            status = r.status,
                            "broadcast: the other gateways could not be reached"
                        ),
                    }
                }
            }
            Response::json(200, counts_json(&total))
        }
        Err(r) => r,
    }
}

/// `POST /v1/kick?player=42[&resume=true]`: the player ends (its token
/// stops working) unless `resume=true` keeps it for a resume.
async fn kick(ctx: &ShardCtx, req: &Request) -> Response {
    let Some(player) = req.param("player").and_then(params::player) else {
        return Response::error(400, "player must be a positive integer");
    };
    let end = match params::ends(req) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let home = shards::home_shard(player, ctx.count);
    match ask(
        ctx,
        home,
        || ctx.admin_kick(player, end),
        |reply| ShardMsg::Kick { player, end, reply },
    )
    .await
    {
        Ok((kicked, ended)) => {
            Response::json(200, format!("{{\"kicked\":{kicked},\"ended\":{ended}}}"))
        }
        Err(r) => r,
    }
}

/// Ask the player's home shard (this one or another) for its state.
async fn player_info(ctx: &ShardCtx, player: u64) -> Result<Option<PlayerInfo>, Response> {
    let home = shards::home_shard(player, ctx.count);
    ask(
        ctx,
        home,
        || ctx.player_info(player),
        |reply| ShardMsg::PlayerInfo { player, reply },
    )
    .await
}

fn player_json(p: &PlayerInfo) -> String {
    format!(
        "{{\"player\":{},\"online\":{},\"seq\":{},\"acked\":{},\"outbox\":{},\"outbox_bytes\":{},\"evictions\":{},\"shard\":{}}}",
        p.player, p.online, p.seq, p.acked, p.outbox, p.outbox_bytes, p.evictions, p.shard
    )
}

/// `GET /v1/players?after=0&limit=100`: one page of the players held, by id.
async fn list_players(ctx: &ShardCtx, req: &Request) -> Response {
    let (after, limit) = match params::page(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let pages = ask_all(
        ctx,
        || ctx.list_players(after, limit),
        |reply| ShardMsg::ListPlayers {
            after,
            limit,
            reply,
        },
    )
    .await;
    let mut all: Vec<PlayerInfo> = match pages {
        Ok(p) => p.into_iter().flatten().collect(),
        Err(r) => return r,
    };
    all.sort_unstable_by_key(|p| p.player);
    let more = all.len() > limit;
    all.truncate(limit);
    let next = match (more, all.last()) {
        (true, Some(p)) => p.player.to_string(),
        _ => "null".into(),
    };
    let items: Vec<String> = all.iter().map(player_json).collect();
    Response::json(
        200,
        format!("{{\"players\":[{}],\"next\":{next}}}", items.join(",")),
    )
}

/// The `to` of a migration or evacuation: another gateway of the cluster,
/// or None (not given): the gateway picks.
fn migration_target<'a>(ctx: &ShardCtx, req: &'a Request) -> Result<Option<&'a str>, Response> {
    let Some(cluster) = &ctx.cluster else {
        return Err(Response::error(409, "this gateway is not in a cluster"));
    };
    let to = match req.param("to") {
        None => return Ok(None),
        Some("") => return Err(Response::error(400, "to must name a gateway id")),
        Some(t) => t,
    };
    if to == cluster.gateway_id {
        return Err(Response::error(
            409,
            "to names this gateway: its players are here already",
        ));
    }
    Ok(Some(to))
}

/// The live peers with their leases.
async fn peer_leases(
    cluster: &crate::cluster::runtime::ClusterHandle,
) -> Result<Vec<crate::cluster::Peer>, Response> {
    ask_cluster(cluster, |reply| crate::cluster::runtime::Cmd::PeerLeases {
        reply,
    })
    .await
}

/// `POST /v1/migrate?player=42[&to=gw-b]`: move a player to another
/// gateway of the cluster (without `to`: the live peer with most room);
/// its client is redirected there. 200 with the target's address, or 409
/// with why (the player stays, unharmed).
async fn migrate(ctx: &ShardCtx, req: &Request) -> Response {
    let Some(player) = req.param("player").and_then(params::player) else {
        return Response::error(400, "player must be a positive integer");
    };
    let to = match migration_target(ctx, req) {
        Ok(Some(t)) => t.to_string(),
        Ok(None) => {
            let Some(cluster) = &ctx.cluster else {
                return Response::error(409, "this gateway is not in a cluster");
            };
            let peers = match peer_leases(cluster).await {
                Ok(p) => p,
                Err(r) => return r,
            };
            match crate::cluster::placement::pick(&peers) {
                Some(p) => p.id.clone(),
                None => return Response::error(409, "no live peer has room for the player"),
            }
        }
        Err(r) => return r,
    };
    let home = shards::home_shard(player, ctx.count);
    let (tx, rx) = flume::bounded(1);
    if home == ctx.id {
        if let Some(me) = ctx.this.borrow().upgrade() {
            let to = to.clone();
            glommio::spawn_local(async move {
                let r = crate::shard::cluster::migrate_player(me, player, to).await;
                let _ = tx.send(r);
            })
            .detach();
        }
    } else {
        let msg = ShardMsg::Migrate {
            player,
            to: to.clone(),
            reply: tx,
        };
        if ctx.mesh.send(home, msg).is_err() {
            return Response::error(503, "the player's shard is stopping");
        }
    }
    let answer = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(SHARD_REPLY).await;
        None
    })
    .await;
    match answer {
        Some(Ok(addr)) => Response::json(
            200,
            format!(
                "{{\"migrated\":true,\"to\":{},\"address\":{}}}",
                super::json_string(&to),
                super::json_string(&addr)
            ),
        ),
        Some(Err(e)) => Response::error(409, &format!("not migrated: {}", e.detail)),
        None => Response::error(503, "the migration did not finish in time"),
    }
}

/// `POST /v1/evacuate[?to=gw-b][&wait=false]`: migrate every player of
/// this gateway to `to`, or (without it) spread over the live,
/// non-draining peers in proportion to their room; paced by
/// `migrate_parallel` and `migrate_rate`. Waits for the end and answers
/// the counts, or with `wait=false` answers 202 at once
/// (`GET /v1/evacuation` follows it, `DELETE` cancels it).
async fn evacuate(ctx: &ShardCtx, req: &Request) -> Response {
    use crate::cluster::placement::Evacuation;
    let wait = match req.param("wait") {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(_) => return Response::error(400, "wait must be true or false"),
    };
    let Some(cluster) = &ctx.cluster else {
        return Response::error(409, "this gateway is not in a cluster");
    };
    let evac = match migration_target(ctx, req) {
        Ok(Some(to)) => Evacuation::new(vec![(to.to_string(), 0)], ctx.count),
        Ok(None) => match peer_leases(cluster).await {
            Ok(peers) => Evacuation::over(&peers, ctx.count),
            Err(r) => return r,
        },
        Err(r) => return r,
    };
    if evac.targets.is_empty() {
        return Response::error(409, "no live peer has room for this gateway's players");
    }
    let evac = std::sync::Arc::new(evac);
    let started = ask_cluster(cluster, |reply| {
        crate::cluster::runtime::Cmd::StartEvacuation {
            evac: evac.clone(),
            reply,
        }
    })
    .await;
    if let Err(mut r) = started {
        r.status = 409;
        return r;
    }
    let (tx, rx) = flume::unbounded();
    for shard in 0..ctx.count {
        let sent = if shard == ctx.id {
            match ctx.this.borrow().upgrade() {
                Some(me) => {
                    let (evac, tx) = (evac.clone(), tx.clone());
                    glommio::spawn_local(async move {
                        let _ = tx.send(crate::shard::cluster::evacuate_shard(me, evac).await);
                    })
                    .detach();
                    true
                }
                None => false,
            }
        } else {
            let msg = ShardMsg::Evacuate {
                evac: evac.clone(),
                reply: tx.clone(),
            };
            ctx.mesh.send(shard, msg).is_ok()
        };
        if !sent {
            // What no shard carries out never ends: end it here.
            evac.cancelled
                .store(true, std::sync::atomic::Ordering::Release);
            evac.shard_done();
            tracing::error!(shard, "evacuation: a shard is stopping");
        }
    }
    if !wait {
        return Response::json(202, evac.json());
    }
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..ctx.count {
        match rx.recv_async().await {
            Ok((o, f)) => {
                ok += o;
                failed += f;
            }
            Err(_) => break,
        }
    }
    Response::json(
        200,
        format!(
            "{{\"migrated\":{ok},\"failed\":{failed},\"seconds\":{:.3},\"evacuation\":{}}}",
            evac.elapsed().as_secs_f64(),
            evac.json()
        ),
    )
}

/// `GET /v1/evacuation`: the running (or last) evacuation's progress;
/// `DELETE`: cancel it (migrations under way finish, no new one starts).
async fn evacuation(ctx: &ShardCtx, cancel: bool) -> Response {
    let Some(cluster) = &ctx.cluster else {
        return Response::error(409, "this gateway is not in a cluster");
    };
    match ask_cluster(cluster, |reply| crate::cluster::runtime::Cmd::Evacuation {
        reply,
    })
    .await
    {
        Ok(Some(evac)) => {
            if cancel {
                evac.cancelled
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Response::json(200, evac.json())
        }
        Ok(None) => Response::error(404, "no evacuation has run on this gateway"),
        Err(r) => r,
    }
}

/// `POST /v1/reload`: re-read the config file (the process's coordinator
/// does it); 200 when applied, 400 with the reason when refused.
async fn reload(ctx: &ShardCtx) -> Response {
    let Some(events) = &ctx.events else {
        return Response::error(503, "no coordinator to reload this gateway");
    };
    let (tx, rx) = flume::bounded(1);
    if events.send(GatewayEvent::Reload(Some(tx))).is_err() {
        return Response::error(503, "the coordinator is gone");
    }
    let outcome = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(SHARD_REPLY).await;
        None
    })
    .await;
    match outcome {
        Some(Ok(())) => Response::json(200, "{\"reloaded\":true}".into()),
        Some(Err(e)) => Response::error(400, &format!("config refused: {e}")),
        None => Response::error(503, "the reload did not finish in time"),
    }
}

/// `POST /v1/upgrade[?binary=/path]`: hand everything to a new process;
/// answered once it runs (202, its pid) or failed (the old process goes
/// on). One at a time: 409 while one runs.
async fn upgrade(ctx: &ShardCtx, req: &Request) -> Response {
    if crate::upgrade::running() {
        return Response::error(409, "an upgrade is already running");
    }
    let Some(events) = &ctx.events else {
        return Response::error(503, "no coordinator to upgrade this gateway");
    };
    let binary = req.param("binary").map(str::to_string);
    let (tx, rx) = flume::bounded(1);
    let ev = GatewayEvent::Upgrade {
        binary,
        reply: Some(tx),
    };
    if events.send(ev).is_err() {
        return Response::error(503, "the coordinator is gone");
    }
    let outcome = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(Duration::from_secs(30)).await;
        None
    })
    .await;
    match outcome {
        Some(Ok(pid)) => {
            Response::json(202, format!("{{\"upgrading\":true,\"pid\":{pid}}}")).closing()
        }
        Some(Err(e)) if e.contains("already running") => Response::error(409, &e),
        Some(Err(e)) if e.contains("demo backend") => Response::error(503, &e),
        Some(Err(e)) => Response::error(502, &format!("upgrade failed, this process goes on: {e}")),
        None => Response::error(503, "the upgrade did not answer in time"),
    }
}

/// `GET /metrics`: every shard's snapshot, rendered here.
async fn metrics(ctx: &ShardCtx) -> Response {
    let snaps: Vec<Snapshot> =
        match ask_all(ctx, || ctx.snapshot(), |reply| ShardMsg::Metrics { reply }).await {
            Ok(s) => s,
            Err(r) => return r,
        };
    let routes = ctx.router().slot_labels();
    let mut text = crate::metrics::render(
        &snaps,
        &crate::metrics::Context {
            routes: &routes,
            connections: ctx.connections.load(std::sync::atomic::Ordering::Acquire) as u64,
            http_connections: ctx
                .http_connections
                .load(std::sync::atomic::Ordering::Acquire) as u64,
        },
    );
    if let Some(cluster) = &ctx.cluster {
        cluster.migrations.render(&mut text);
    }
    if let Some(t) = ctx.upgraded.get() {
        crate::metrics::render_upgrade(&mut text, t);
    }
    Response::text(200, text)
}
