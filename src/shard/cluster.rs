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
                    login: matches!(arrival, Arrival::Login { .. }),
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
                    .map_err(|e| {
                        if e == crate::cluster::ALREADY_ONLINE {
                            // The holder keeps its live session: the
                            // login is answered ALREADY_ONLINE.
                            Error::new(
                                crate::error::Origin::Cluster,
                                crate::protocol::Code::AlreadyOnline,
                                true,
                                e,
                            )
                        } else {
                            Error::cluster(e)
                        }
                    })
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
    migrate_to(ctx, player, to).await.map_err(|f| f.error)
}

/// Why a migration failed, and whether its target is to blame (it refused
/// or did not confirm): an evacuation then skips that target.
pub struct Failed {
    pub error: Error,
    pub target_failed: bool,
}

/// [`migrate_player`], with each step timed and each failure counted.
pub async fn migrate_to(ctx: Rc<ShardCtx>, player: u64, to: String) -> Result<String, Failed> {
    use crate::cluster::placement::Step;
    let Some(cluster) = ctx.cluster.clone() else {
        return Err(Failed {
            error: Error::cluster("this gateway is not in a cluster"),
            target_failed: false,
        });
    };
    let stats = cluster.migrations.clone();
    let t = Instant::now();
    if let Err(error) = ctx.core_step(|c, _| c.begin_migration(player)) {
        stats.fail(Step::Hold, "not_held");
        return Err(Failed {
            error,
            target_failed: false,
        });
    }
    stats.record(Step::Hold, t.elapsed());
    let rollback = |ctx: &ShardCtx, why: Error, target_failed: bool| -> Result<String, Failed> {
        let t = Instant::now();
        ctx.core_step(|c, now| c.rollback_migration(player, &why, now));
        stats.record(Step::Rollback, t.elapsed());
        Err(Failed {
            error: why,
            target_failed,
        })
    };
    // Requests in flight finish first: each gets its answer (or TIMEOUT)
    // within the backend's request timeout, so after this wait no backend
    // answer can reach this gateway for the player, and the client's
    // contract stays simple: what the source read is answered in the
    // replay at the target; what it never read, the client sends again.
    let t = Instant::now();
    let deadline =
        Instant::now() + ctx.cfg().backend.request_timeout + std::time::Duration::from_secs(1);
    while ctx.core_step(|c, _| c.player_inflight(player)) > 0 {
        if Instant::now() >= deadline {
            stats.fail(Step::Drain, "inflight_timeout");
            return rollback(
                &ctx,
                Error::cluster("requests in flight did not finish in time"),
                false,
            );
        }
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    stats.record(Step::Drain, t.elapsed());
    let unix = crate::snapshot::unix_ms_now();
    let image = match ctx.core_step(|c, now| c.migration_image(player, now, unix)) {
        None => {
            stats.fail(Step::Transfer, "ended");
            return rollback(&ctx, Error::cluster("the player ended meanwhile"), false);
        }
        Some(Err(e)) => {
            stats.fail(Step::Transfer, "other");
            return rollback(&ctx, e, false);
        }
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
        return rollback(&ctx, Error::cluster("the cluster is stopped"), false);
    }
    // No timeout of our own: the control thread always answers (its waits
    // are bounded), and only its answer says whether the target took the
    // player; rolling back before it could leave the player on both.
    let answer = rx.recv_async().await.ok();
    match answer {
        Some(Ok(addrs)) => {
            let t = Instant::now();
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
                if let Ok(Ok(routed)) = rrx.recv_async().await {
                    // A guess (Redis failing over) reaches every peer: none
                    // may forward it again.
                    let hops = if routed.guessed { 3 } else { 1 };
                    for (http, _) in routed.routes.into_iter().filter(|(h, _)| !h.is_empty()) {
                        for (msg_id, body) in &held {
                            let (ftx, frx) = flume::bounded(1);
                            let _ = cluster.cmds.send(crate::cluster::runtime::Cmd::Forward {
                                http: http.clone(),
                                path: format!("/v1/push?players={player}&msg={msg_id}&hops={hops}"),
                                body: body.clone(),
                                token: ctx.cfg().push_token.clone(),
                                reply: ftx,
                            });
                            // One at a time, so they keep their order there.
                            if let Ok(Err(e)) | Err(e) = frx
                                .recv_async()
                                .await
                                .map_err(|e| e.to_string())
                                .map(|r| r.map_err(|e| e.reason))
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
            stats.record(Step::Redirect, t.elapsed());
            Ok(addr)
        }
        // The directory step or the target failed (it never confirmed).
        Some(Err(e)) => rollback(&ctx, Error::cluster(e), true),
        None => rollback(&ctx, Error::cluster("the cluster is stopped"), false),
    }
}

/// Migrate every player of this shard to the targets of `evac`, spread by
/// their weights, at most `migrate_parallel` at a time and this shard's
/// share of `migrate_rate` per second; a target that fails a migration is
/// skipped from then on (the player tries the next one). Stops starting
/// new ones once the evacuation is cancelled. Returns (migrated, failed).
pub async fn evacuate_shard(
    ctx: Rc<ShardCtx>,
    evac: std::sync::Arc<crate::cluster::placement::Evacuation>,
) -> (u64, u64) {
    use std::sync::atomic::Ordering;
    let ids: Vec<u64> = ctx.core_step(|c, _| c.player_ids());
    evac.total.fetch_add(ids.len() as u64, Ordering::AcqRel);
    let (parallel, rate) = match &ctx.cluster {
        Some(c) => (c.migrate_parallel, c.migrate_rate),
        None => (1, 0),
    };
    // This shard's share of the gateway's rate: one start per `gap`.
    let gap =
        (rate > 0).then(|| std::time::Duration::from_secs_f64(ctx.count as f64 / f64::from(rate)));
    let spread = Rc::new(std::cell::RefCell::new(
        crate::cluster::placement::Spread::default(),
    ));
    let mut running: std::collections::VecDeque<glommio::task::JoinHandle<bool>> =
        std::collections::VecDeque::new();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut next_start = Instant::now();
    let mut settle = |moved: bool| {
        if moved {
            ok += 1;
        } else {
            failed += 1;
        }
    };
    for p in ids {
        if evac.cancelled.load(Ordering::Acquire) {
            break;
        }
        while running.len() >= parallel {
            if let Some(t) = running.pop_front() {
                settle(t.await.unwrap_or(false));
            }
        }
        if let Some(gap) = gap {
            let now = Instant::now();
            if next_start > now {
                glommio::timer::sleep(next_start - now).await;
            }
            next_start = next_start.max(now) + gap;
        }
        let (ctx, evac, spread) = (ctx.clone(), evac.clone(), spread.clone());
        let task = glommio::spawn_local(async move {
            let moved = migrate_spread(ctx, p, &evac, &spread).await;
            let count = if moved { &evac.moved } else { &evac.failed };
            count.fetch_add(1, Ordering::AcqRel);
            moved
        })
        .detach();
        running.push_back(task);
    }
    while let Some(t) = running.pop_front() {
        settle(t.await.unwrap_or(false));
    }
    evac.shard_done();
    (ok, failed)
}

/// Migrate `p` to the next target of `spread`, then (if that target was
/// to blame) to another one; whether it moved.
async fn migrate_spread(
    ctx: Rc<ShardCtx>,
    p: u64,
    evac: &crate::cluster::placement::Evacuation,
    spread: &std::cell::RefCell<crate::cluster::placement::Spread>,
) -> bool {
    use std::sync::atomic::Ordering;
    // A target, then (if it was to blame) another one.
    for _ in 0..2 {
        let Some(i) = spread.borrow_mut().next(evac) else {
            return false;
        };
        let to = evac.targets[i].id.clone();
        match migrate_to(ctx.clone(), p, to.clone()).await {
            Ok(_) => {
                evac.targets[i].moved.fetch_add(1, Ordering::AcqRel);
                return true;
            }
            Err(f) if f.target_failed => {
                if !evac.targets[i].failed.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        target = to,
                        error = %f.error,
                        "evacuation: a target failed; skipped from now on"
                    );
                }
            }
            Err(_) => return false,
        }
    }
    false
}
