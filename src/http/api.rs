//! The endpoints of the push and admin API (PROTOCOL.md section 5).

use super::{Request, Response};
use crate::shard::ShardCtx;
use std::rc::Rc;

/// Answer one request on shard `ctx`.
pub async fn handle(ctx: Rc<ShardCtx>, req: Request) -> Response {
    let _ = &ctx;
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => Response::json(200, "{\"status\":\"ok\"}".into()),
        (_, "/healthz") => Response::error(405, "use GET"),
        _ => Response::error(404, "no such endpoint"),
    }
}
