//! The shell's cluster flows: steps that wait on the cluster's control
//! threads (Redis) between calls into the core: claiming a player before
//! a login or resume completes, migrating a player to another gateway, and
//! evacuating a shard.

use super::ShardCtx;
use crate::error::Error;
use crate::session::{Arrival, SessionId};
use std::rc::Rc;
use std::time::Instant;

/// In a cluster: claim the player (fetching its state from the gateway
/// that holds it), then complete the login or resume here.
pub(super) async fn arrive_clustered(
    ctx: Rc<ShardCtx>,
    cluster: crate::cluster::runtime::ClusterHandle,
    sid: SessionId,
    arrival: Arrival,
) {
    use crate::cluster::runtime::Cmd;
    use crate::cluster::Claim;
    let player = arrival.player();
    let wait = |d: std::time::Duration| glommio::timer::sleep(d);
    let (tx, rx) = flume::bounded(1);
    let claim = if cluster.cmds.send(Cmd::Claim { player, reply: tx }).is_ok() {
        futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
            wait(std::time::Duration::from_secs(5)).await;
            None
        })
        .await
        .unwrap_or_else(|| Err("the cluster did not answer".into()))
    } else {
        Err("the cluster is stopped".into())
    };
    let outcome: Result<(), Error> = match claim.map_err(Error::cluster) {
        Ok(Claim::Granted { .. }) => Ok(()),
        Ok(Claim::TakenOver { from, .. }) => {
            // Its gateway died without handing it over: what it held is
            // lost, and a fresh login will say so (a new life).
            tracing::warn!(
                player,
                from,
                "player taken over from a gateway whose lease lapsed"
            );
            ctx.start_lost(player);
            Ok(())
        }
        Ok(Claim::Held { by, .. }) => {
            let (tx, rx) = flume::bounded(1);
            let fetched = if cluster
                .cmds
                .send(Cmd::Fetch {
                    player,
                    from: by.clone(),
                    reply: tx,
                })
                .is_ok()
            {
                // No timeout of our own: the control thread always answers
                // (its Redis calls are bounded), and giving up before it
                // did could drop a state it was about to hand us.
                rx.recv_async()
                    .await
                    .unwrap_or_else(|_| Err("the cluster is stopped".into()))
                    .map_err(Error::cluster)
            } else {
                Err(Error::cluster("the cluster is stopped"))
            };
            match fetched {
                Ok(Some(bytes)) => match crate::snapshot::Image::decode(&bytes) {
                    Ok(img) => {
                        ctx.restore(&img.players);
                        tracing::info!(player, from = by, "player taken over from another gateway");
                        Ok(())
                    }
                    Err(e) => Err(Error::cluster(format!("hand-over state unusable: {e}"))),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) if cluster.when_redis_down == crate::config::RedisDown::Local => {
            tracing::warn!(player, error = %e, "cluster unreachable: serving the player here alone");
            Ok(())
        }
        Err(e) => Err(e),
    };
    ctx.claimed(sid, arrival, outcome);
}

/// Migrate `player` to gateway `to`: hold its session's new requests, let
/// those in flight finish, hand its state over through the cluster, then
/// `REDIRECT` the client there. Any failure rolls back: the player stays.
pub async fn migrate_player(ctx: Rc<ShardCtx>, player: u64, to: String) -> Result<String, Error> {
    let Some(cluster) = ctx.cluster.clone() else {
        return Err(Error::cluster("this gateway is not in a cluster"));
    };
    ctx.core_step(|c, _| c.begin_migration(player))?;
    let rollback = |ctx: &ShardCtx, why: Error| -> Result<String, Error> {
        ctx.core_step(|c, now| c.rollback_migration(player, &why, now));
        Err(why)
    };
    // Requests in flight finish first: each gets its answer (or TIMEOUT)
    // within the backend's request timeout, so after this wait no backend
    // answer can reach this gateway for the player, and the client's
    // contract stays simple: what the source read is answered in the
    // replay at the target; what it never read, the client sends again.
    let deadline =
        Instant::now() + ctx.cfg().backend.request_timeout + std::time::Duration::from_secs(1);
    while ctx.core_step(|c, _| c.player_inflight(player)) > 0 {
        if Instant::now() >= deadline {
            return rollback(
                &ctx,
                Error::cluster("requests in flight did not finish in time"),
            );
        }
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    let unix = crate::snapshot::unix_ms_now();
    let image = match ctx.core_step(|c, now| c.migration_image(player, now, unix)) {
        None => return rollback(&ctx, Error::cluster("the player ended meanwhile")),
        Some(Err(e)) => return rollback(&ctx, e),
        Some(Ok(b)) => b,
    };
    let (tx, rx) = flume::bounded(1);
    let cmd = crate::cluster::runtime::Cmd::Migrate {
        player,
        to: to.clone(),
        image,
        reply: tx,
    };
    if cluster.cmds.send(cmd).is_err() {
        return rollback(&ctx, Error::cluster("the cluster is stopped"));
    }
    // No timeout of our own: the control thread always answers (its waits
    // are bounded), and only its answer says whether the target took the
    // player; rolling back before it could leave the player on both.
    let answer = rx.recv_async().await.ok();
    match answer {
        Some(Ok(addrs)) => {
            // The target's TCP address, and its WebSocket URL if it has one:
            // a WebSocket client is sent there.
            let mut lines = addrs.lines();
            let addr = lines.next().unwrap_or_default().to_string();
            let ws = lines.next().map(str::to_string);
            let to_addr = match ws {
                Some(ws) if ctx.player_on_websocket(player) => ws,
                _ => addr.clone(),
            };
            let held = ctx.core_step(|c, now| c.complete_migration(player, &to_addr, now));
            tracing::info!(player, to, addr = to_addr, "player migrated");
            // Pushes that came meanwhile follow it to its new gateway.
            if !held.is_empty() {
                let (rtx, rrx) = flume::bounded(1);
                let _ = cluster.cmds.send(crate::cluster::runtime::Cmd::Route {
                    players: vec![player],
                    reply: rtx,
                });
                if let Ok(Ok(routes)) = rrx.recv_async().await {
                    for (http, _) in routes.into_iter().filter(|(h, _)| !h.is_empty()) {
                        for (msg_id, body) in &held {
                            let (ftx, frx) = flume::bounded(1);
                            let _ = cluster.cmds.send(crate::cluster::runtime::Cmd::Forward {
                                http: http.clone(),
                                path: format!("/v1/push?players={player}&msg={msg_id}&hops=1"),
                                body: body.clone(),
                                token: ctx.cfg().push_token.clone(),
                                reply: ftx,
                            });
                            // One at a time, so they keep their order there.
                            if let Ok(Err(e)) | Err(e) =
                                frx.recv_async().await.map_err(|e| e.to_string())
                            {
                                tracing::error!(
                                    player,
                                    msg_id,
                                    error = %e,
                                    "a push held during the migration could not follow it"
                                );
                            }
                        }
                    }
                } else {
                    tracing::error!(
                        player,
                        pushes = held.len(),
                        "pushes held during the migration could not follow it"
                    );
                }
            }
            Ok(addr)
        }
        Some(Err(e)) => rollback(&ctx, Error::cluster(e)),
        None => rollback(&ctx, Error::cluster("the cluster is stopped")),
    }
}

/// Players migrated at once per shard during an evacuation.
pub const EVACUATE_PARALLEL: usize = 16;

/// Migrate every player of this shard to `to`, `EVACUATE_PARALLEL` at a
/// time; returns (migrated, failed).
pub async fn evacuate_shard(ctx: Rc<ShardCtx>, to: String) -> (u64, u64) {
    let ids: Vec<u64> = ctx.core_step(|c, _| c.player_ids());
    let (mut ok, mut failed) = (0, 0);
    for chunk in ids.chunks(EVACUATE_PARALLEL) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&p| glommio::spawn_local(migrate_player(ctx.clone(), p, to.clone())))
            .collect();
        for t in tasks {
            if t.await.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
    }
    (ok, failed)
}
