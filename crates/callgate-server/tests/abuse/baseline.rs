//! The control: the canary with no attack, in the same process and run as the attacks, so
//! each attack's canary p99 can be read against it (`bench/abuse.sh` reports the ratio).

use super::support::*;

/// The canary alone, for as long as an attack's canary runs.
#[tokio::test]
async fn the_canary_with_no_attack() {
    let seconds = Strength::get().pick(1, 10);
    let mut rig = Rig::start("baseline: no attack", |_| {}).await;
    let canary = rig.canary().await;
    canary.alive(50 * seconds).await;
    rig.figure("seconds", seconds);
    rig.finish(canary).await;
}
