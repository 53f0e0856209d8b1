//! Running probes: all at once for `-once`, or each on its own interval for the service.
//!
//! Every probe runs in a task of its own with a timeout of 80 % of its interval (derpprobe's
//! rule), so a hanging node costs its own probes that timeout and never delays another probe. A
//! probe that panics is recorded as failed, not fatal. In service mode the DERP map is read again
//! every `-interval`; probes that appear start (at a random point of their interval with
//! `-spread`), probes that disappear stop, and a map that fails to load keeps the previous plan.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::plan::{plan, PlanConfig, ProbeSpec};
use crate::probes::{self, ProbeEnv};
use crate::results::{Outcome, ProbeRecord, Results};

/// The timeout of one run: 80 % of the interval.
pub fn timeout_for(spec: &ProbeSpec) -> Duration {
    spec.interval.mul_f64(0.8).max(Duration::from_millis(100))
}

/// Runs `spec` once within its timeout and records the outcome.
pub async fn run_one(spec: ProbeSpec, env: ProbeEnv, results: Results) -> Outcome {
    let started = SystemTime::now();
    results.started(&spec.name, started);
    let budget = timeout_for(&spec);
    let task = {
        let spec = spec.clone();
        tokio::spawn(async move {
            tokio::time::timeout(budget, probes::run(&spec, &env, budget))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {budget:?}")))
        })
    };
    let result = match task.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err("probe panicked".into()),
        Err(e) => Err(format!("probe task: {e}")),
    };
    if let Err(e) = &result {
        tracing::info!(probe = %spec.name, "bad: {e}");
    }
    let outcome = Outcome { result, started, ended: SystemTime::now() };
    results.finished(&spec.name, outcome.clone());
    outcome
}

/// Runs every probe of `specs` once, all concurrently; returns their records by name.
pub async fn once(specs: Vec<ProbeSpec>, env: ProbeEnv, results: Results) -> Vec<ProbeRecord> {
    results.set_plan(&specs);
    let mut set = JoinSet::new();
    for spec in specs {
        set.spawn(run_one(spec, env.clone(), results.clone()));
    }
    while set.join_next().await.is_some() {}
    results.snapshot().iter().map(ProbeRecord::of).collect()
}

/// The service: re-reads the map every `map_interval`, keeps one loop per planned probe, until
/// `stop` is cancelled.
pub async fn run_forever(
    source: String,
    cfg: PlanConfig,
    map_interval: Duration,
    spread: bool,
    env: ProbeEnv,
    results: Results,
    stop: CancellationToken,
) {
    let mut running: HashMap<String, (ProbeSpec, CancellationToken)> = HashMap::new();
    loop {
        match crate::mapsource::load(&source).await {
            Ok(map) => {
                results.set_map_error(None);
                let specs = plan(&map, &cfg);
                running.retain(|name, (old, token)| {
                    let keep = specs.iter().any(|s| &s.name == name && s == old);
                    if !keep {
                        token.cancel();
                    }
                    keep
                });
                results.set_plan(&specs);
                for spec in specs {
                    if running.contains_key(&spec.name) {
                        continue;
                    }
                    let token = stop.child_token();
                    tokio::spawn(probe_loop(
                        spec.clone(),
                        spread,
                        env.clone(),
                        results.clone(),
                        token.clone(),
                    ));
                    running.insert(spec.name.clone(), (spec, token));
                }
            }
            Err(e) => {
                tracing::warn!("{e:#}; keeping the previous plan");
                results.set_map_error(Some(format!("{e:#}")));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(map_interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn probe_loop(spec: ProbeSpec, spread: bool, env: ProbeEnv, results: Results, stop: CancellationToken) {
    if spread {
        let delay = spec.interval.mul_f64(rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = run_one(spec.clone(), env.clone(), results.clone()) => {}
            _ = stop.cancelled() => return,
        }
    }
}
