//! What a node tells the outside about itself, besides `Status`: the
//! gRPC health service's verdict, kept truthful by a task, and the gauges
//! a Prometheus scrape reads (see [`crate::metrics`]).
//!
//! Health rules: NOT_SERVING while the engine is poisoned (it takes no more
//! writes), while its state has diverged from the leader's (the divergence
//! alarm: it serves no reads), or once no leader has been known for more
//! than twice the election timeout; SERVING otherwise. A leader is known while this node
//! leads, or follows a leader it heard from within the election timeout.
//! The verdict applies to the overall service (`""`) and to `kv.v1.Kv`;
//! `kv.v1.Replication` stays SERVING (its peers judge it by its answers).
//!
//! It does not change the node: it only reads its state.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::Node;
use super::Role;

/// The gRPC service names whose health follows the node's.
pub const HEALTH_SERVICES: [&str; 2] = ["", "kv.v1.Kv"];

/// What the health rules say, from what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Serving,
    /// The engine is poisoned.
    Poisoned,
    /// The state failed the leader's digest checkpoint.
    Diverged,
    /// No leader known for this long (more than twice the election timeout).
    NoLeader(Duration),
}

impl Health {
    /// The rule: poisoned, diverged, or no leader for more than
    /// `2 * election_timeout`.
    pub fn judge(
        poisoned: bool,
        diverged: bool,
        without_leader: Duration,
        election_timeout: Duration,
    ) -> Health {
        if poisoned {
            Health::Poisoned
        } else if diverged {
            Health::Diverged
        } else if without_leader > 2 * election_timeout {
            Health::NoLeader(without_leader)
        } else {
            Health::Serving
        }
    }

    fn status(self) -> ServingStatus {
        match self {
            Health::Serving => ServingStatus::Serving,
            _ => ServingStatus::NotServing,
        }
    }
}

impl Node {
    /// True if this node knows a live leader now: it leads, or it follows
    /// one it heard from within the election timeout.
    fn leader_known(&self) -> bool {
        self.core().leader_known(self.now())
    }

    /// Keeps the health service's verdict for [`HEALTH_SERVICES`] up to
    /// date, checking a few times per election timeout; runs until the node
    /// stops. Each change is logged.
    pub(super) async fn watch_health(self: Arc<Self>, reporter: HealthReporter) {
        let timeout = Duration::from_millis(self.config.election_timeout_ms);
        let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(100));
        let mut last_leader = self.env.clock.now();
        // Nothing reported yet: the first verdict is set on every name.
        let mut reported = None;
        let healthy = metrics::gauge!("kv_healthy");
        healthy.set(1.0);
        loop {
            let now = self.env.clock.now();
            if self.leader_known() {
                last_leader = now;
            }
            let health = Health::judge(
                self.engine.poisoned(),
                self.engine.divergence().is_some(),
                now.saturating_duration_since(last_leader),
                timeout,
            );
            let status = health.status();
            if reported != Some(status) {
                match health {
                    Health::Serving if reported.is_none() => {}
                    Health::Serving => tracing::info!("health: SERVING again"),
                    Health::Poisoned => {
                        tracing::warn!("health: NOT_SERVING (the engine is poisoned)")
                    }
                    Health::Diverged => {
                        tracing::warn!("health: NOT_SERVING (divergence alarm)")
                    }
                    Health::NoLeader(d) => tracing::warn!(
                        without_leader_ms = d.as_millis() as u64,
                        "health: NOT_SERVING (no leader known for over twice the election timeout)"
                    ),
                }
                for service in HEALTH_SERVICES {
                    reporter.set_service_status(service, status).await;
                }
                healthy.set(if status == ServingStatus::Serving {
                    1.0
                } else {
                    0.0
                });
                reported = Some(status);
            }
            tokio::time::sleep(tick).await;
        }
    }

    /// Sets the gauges a scrape reads (see [`crate::metrics::GAUGES`]) from
    /// the node's state now. Called on the metrics thread, per scrape.
    pub fn publish_gauges(&self) {
        use metrics::gauge;
        let stats = self.engine.stats();
        let (role, leader_id, term, peers) = {
            let core = self.core();
            (
                core.role(),
                core.leader(),
                core.term(),
                core.peers().clone(),
            )
        };
        gauge!("kv_last_lsn").set(stats.last_lsn as f64);
        gauge!("kv_durable_lsn").set(stats.durable_lsn as f64);
        gauge!("kv_commit_lsn").set(self.engine.commit_lsn() as f64);
        gauge!("kv_applied_lsn").set(stats.applied_lsn as f64);
        gauge!("kv_snapshot_lsn").set(stats.snapshot_lsn as f64);
        gauge!("kv_keys").set(stats.keys as f64);
        gauge!("kv_term").set(term as f64);
        gauge!("kv_leader_id").set(leader_id.unwrap_or(0) as f64);
        for r in [Role::Follower, Role::Candidate, Role::Leader] {
            gauge!("kv_role", "role" => r.name()).set(if r == role { 1.0 } else { 0.0 });
        }
        gauge!("kv_engine_poisoned").set(if stats.poisoned.is_some() { 1.0 } else { 0.0 });
        gauge!("kv_divergence_alarm").set(if self.engine.divergence().is_some() {
            1.0
        } else {
            0.0
        });
        gauge!(crate::metrics::WAL_BYTES).set(self.engine.wal_bytes() as f64);
        let leads = role == Role::Leader;
        let followers: Vec<(u64, u64, u64, bool)> = peers
            .iter()
            .map(|(id, f)| {
                (
                    *id,
                    stats.last_lsn.saturating_sub(f.progress.match_lsn),
                    f.progress.inflight_bytes,
                    f.connected,
                )
            })
            .collect();
        for (id, lag, inflight, connected) in followers {
            let follower = id.to_string();
            let (lag, inflight, connected) = if leads {
                (lag as f64, inflight as f64, f64::from(u8::from(connected)))
            } else {
                (0.0, 0.0, 0.0)
            };
            gauge!("kv_follower_lag_records", "follower" => follower.clone()).set(lag);
            gauge!("kv_follower_inflight_bytes", "follower" => follower.clone()).set(inflight);
            gauge!("kv_follower_connected", "follower" => follower).set(connected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules() {
        let t = Duration::from_millis(300);
        assert_eq!(
            Health::judge(false, false, Duration::ZERO, t),
            Health::Serving
        );
        assert_eq!(Health::judge(false, false, 2 * t, t), Health::Serving);
        let long = 2 * t + Duration::from_millis(1);
        assert_eq!(Health::judge(false, false, long, t), Health::NoLeader(long));
        assert_eq!(
            Health::judge(true, false, Duration::ZERO, t),
            Health::Poisoned
        );
        assert_eq!(
            Health::judge(false, true, Duration::ZERO, t),
            Health::Diverged
        );
    }
}

#[cfg(test)]
mod node_tests {
    use super::*;
    use crate::engine::{Engine, Op};
    use crate::server::config::NodeConfig;
    use crate::server::env::{NodeEnv, Offload};
    use crate::storage::{SimOptions, SimStorage};
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
    use tonic_health::server::HealthService;

    async fn check(service: &HealthService, name: &str) -> i32 {
        let reply: HealthCheckResponse = service
            .check(tonic::Request::new(HealthCheckRequest {
                service: name.into(),
            }))
            .await
            .unwrap()
            .into_inner();
        reply.status
    }

    /// A lone fixed leader (so a leader is always known) on a simulated
    /// disk whose next fsync fails: SERVING until the failed sync poisons
    /// the engine, NOT_SERVING on both service names after.
    #[tokio::test(flavor = "current_thread")]
    async fn a_poisoned_engine_turns_health_to_not_serving() {
        let config: NodeConfig = toml::from_str(
            "cluster_id = \"c\"\nnode_id = 1\nlisten = \"127.0.0.1:1001\"\n\
             data_dir = \"/kv\"\nleader = 1\nelection_timeout_ms = 60\n\
             heartbeat_ms = 20\nrpc_timeout_ms = 200\n\
             [[members]]\nid = 1\naddr = \"127.0.0.1:1001\"\n",
        )
        .unwrap();
        let disk = SimStorage::new(SimOptions::default());
        let engine = Engine::open(Arc::new(disk.clone()), config.engine_config()).unwrap();
        let env = NodeEnv {
            offload: Offload::Inline,
            ..NodeEnv::default()
        };
        let node = Node::with_env(config, Arc::new(engine), env).unwrap();
        let (reporter, _) = tonic_health::server::health_reporter();
        let service = HealthService::from_health_reporter(reporter.clone());
        tokio::spawn(node.clone().watch_health(reporter));
        // Well past twice the election timeout: a known leader keeps it up.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for name in HEALTH_SERVICES {
            assert_eq!(
                check(&service, name).await,
                Wire::Serving as i32,
                "{name:?}"
            );
        }
        disk.fail_next_sync();
        let engine = node.engine().clone();
        engine
            .submit(Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            })
            .unwrap();
        assert!(
            engine.flush().is_err(),
            "the failed sync did not fail the flush"
        );
        assert!(engine.poisoned());
        let mut waited = Duration::ZERO;
        for name in HEALTH_SERVICES {
            while check(&service, name).await != Wire::NotServing as i32 {
                assert!(waited < Duration::from_secs(2), "{name:?} still SERVING");
                tokio::time::sleep(Duration::from_millis(10)).await;
                waited += Duration::from_millis(10);
            }
        }
    }
}
