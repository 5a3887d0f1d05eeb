//! Per-key limits and budgets across real replicas sharing a real Redis (and, where a test
//! needs a load balancer, a real HAProxy): global, not per replica; reserved before the
//! upstream call and settled after; leases of a killed replica expire; Redis faults behave
//! as `on_redis_error` says and are recovered without restarting the gateways.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::app::{App, LLAMA_ID, TestApp};
use crate::auth::KEY;
use crate::client::expect_error;
use crate::cluster::{
    Balancer, RedisServer, replicas, signal, wait_for, wait_for_redis, wait_until,
};
use crate::emulator::Scenario;

/// A second key, without tight limits, that keeps requests flowing.
const BUSY_KEY: &str = "mg-busy-key-9876543210";

/// Replicas sharing `redis`, each with the key `team-a` ([`KEY`]) limited by `limits`, and
/// answering every prompt with 20 pieces; waits until each reaches Redis.
async fn sharing(redis: &RedisServer, n: usize, limits: &str, cluster: &str) -> Vec<App> {
    let url = redis.url();
    let apps = replicas(n, || {
        TestApp::new()
            .api_key("team-a", KEY, limits)
            .api_key("busy", BUSY_KEY, "requests_per_minute = 100000")
            .redis(&url)
            .cluster(cluster)
            .scenario(LLAMA_ID, Scenario::reply(["t"; 20]))
    })
    .await;
    for app in &apps {
        wait_for_redis(&app.url, "ok").await;
    }
    apps
}

/// `POST /invoke` at `url` as `key`, asking for at most `max_tokens`.
async fn invoke(url: &str, key: &str, max_tokens: u32) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/invoke"))
        .bearer_auth(key)
        .json(&json!({"model": "llama3", "prompt": "hi", "max_tokens": max_tokens}))
        .send()
        .await
        .expect("the gateway answers")
}

/// Opens a stream on `app` that the model keeps open (one piece, then silence), holding
/// its key's lease and its reservation of `max_tokens`.
async fn hold_a_stream(app: &App, max_tokens: u32) -> reqwest::Response {
    app.emulator.script(LLAMA_ID, Scenario::stall(["…"]));
    let held = reqwest::Client::new()
        .get(format!(
            "{}/stream?model=llama3&prompt=hold&max_tokens={max_tokens}",
            app.url
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(held.status(), 200);
    app.emulator.script(LLAMA_ID, Scenario::reply(["t"; 20]));
    held
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|value| value.parse().ok())
        .expect("a Retry-After in seconds")
}

/// What a `budget_exhausted` message says is left of the budget.
fn budget_left(message: &str) -> u32 {
    message
        .split(" has ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|left| left.parse().ok())
        .unwrap_or_else(|| panic!("no budget left in {message:?}"))
}

/// Tokens an `/invoke` answer says it used.
async fn used_tokens(response: reqwest::Response) -> u32 {
    let body: serde_json::Value = response.json().await.unwrap();
    let usage = &body["usage"];
    (usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()) as u32
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn a_key_gets_its_requests_per_minute_across_all_replicas_not_per_replica() {
    let redis = RedisServer::start().await;
    let apps = sharing(&redis, 3, "requests_per_minute = 6", "").await;
    let balancer = Balancer::start(&apps).await;
    let mut served_by = Vec::new();
    let mut refused = 0;
    for _ in 0..12 {
        let response = invoke(&balancer.url, KEY, 16).await;
        if response.status() == 200 {
            served_by.push(response.headers()["x-replica"].to_str().unwrap().to_owned());
        } else {
            assert!((1..=10).contains(&retry_after(&response)));
            let message = expect_error(response, 429, "rate_limited").await;
            assert!(message.contains("requests per minute"), "{message}");
            refused += 1;
        }
    }
    assert_eq!(
        served_by.len(),
        6,
        "6 in all, not 6 per replica: {served_by:?}"
    );
    assert_eq!(refused, 6);
    served_by.sort();
    served_by.dedup();
    assert_eq!(served_by, ["r0", "r1", "r2"], "every replica served some");
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn tokens_reserved_on_one_replica_count_on_another_until_settled() {
    let redis = RedisServer::start().await;
    let apps = sharing(&redis, 2, "tokens_per_minute = 50", "").await;
    // 60 tokens reserved on r0 (its max_tokens): more than the key's 50 per minute.
    let held = hold_a_stream(&apps[0], 60).await;
    let refused = invoke(&apps[1].url, KEY, 1).await;
    let message = expect_error(refused, 429, "rate_limited").await;
    assert!(message.contains("tokens per minute"), "{message}");

    // The held stream ends having used next to nothing: its reservation is given back.
    drop(held);
    wait_until(
        "r1 admits the key again",
        Duration::from_secs(5),
        || async { invoke(&apps[1].url, KEY, 10).await.status() == 200 },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn a_daily_budget_holds_across_replicas_reserved_then_settled_to_the_real_usage() {
    let redis = RedisServer::start().await;
    let apps = sharing(&redis, 2, "tokens_per_day = 200", "").await;

    // While r0 has 150 tokens reserved, r1 cannot reserve 60 more.
    let held = hold_a_stream(&apps[0], 150).await;
    let refused = invoke(&apps[1].url, KEY, 60).await;
    let wait = retry_after(&refused);
    assert!((1..=86_400).contains(&wait), "until midnight UTC: {wait}");
    let message = expect_error(refused, 429, "budget_exhausted").await;
    assert!(message.contains("tokens_per_day"), "{message}");
    drop(held);

    // Once its client has left, the held stream's reservation of 150 is settled to what it
    // generated until then: no longer 50 left, but not all 200 either.
    let left_after_held = wait_for(
        "r0 settles the held stream",
        Duration::from_secs(5),
        || async {
            // More than is ever left: refused, costing nothing, saying what is left.
            let refused = invoke(&apps[1].url, KEY, 200).await;
            let left = budget_left(&expect_error(refused, 429, "budget_exhausted").await);
            (left > 50).then_some(left)
        },
    )
    .await;
    assert!(left_after_held < 200, "the held stream paid nothing");

    // A request that reserves 100 and uses fewer is settled to what it used...
    let used = used_tokens(invoke(&apps[1].url, KEY, 100).await).await;
    assert!(used < 100, "{used}");
    let left = left_after_held - used;
    // ...so that exactly what is left fits, on the other replica, once settled.
    wait_until(
        "r0 admits a request for all that is left",
        Duration::from_secs(5),
        || async { invoke(&apps[0].url, KEY, left).await.status() == 200 },
    )
    .await;
    // That one used `used` tokens too, and reserved more than that is left now.
    let over = invoke(&apps[1].url, KEY, left - used + 1).await;
    expect_error(over, 429, "budget_exhausted").await;
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn concurrent_streams_hold_across_replicas() {
    let redis = RedisServer::start().await;
    let apps = sharing(&redis, 3, "concurrent_streams = 2", "").await;
    let first = hold_a_stream(&apps[0], 16).await;
    let _second = hold_a_stream(&apps[1], 16).await;
    let refused = invoke(&apps[2].url, KEY, 16).await;
    let message = expect_error(refused, 429, "rate_limited").await;
    assert!(message.contains("in flight"), "{message}");

    drop(first);
    wait_until(
        "a lease freed on r0 lets r2 in",
        Duration::from_secs(5),
        || async { invoke(&apps[2].url, KEY, 16).await.status() == 200 },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn the_leases_of_a_killed_replica_expire_within_the_ttl_and_live_ones_are_renewed() {
    const TTL: Duration = Duration::from_secs(2);
    let redis = RedisServer::start().await;
    let apps = sharing(&redis, 2, "concurrent_streams = 1", "lease_ttl = \"2s\"").await;
    let _held = hold_a_stream(&apps[0], 16).await;
    // Renewed while the stream lives: still held after twice its TTL.
    tokio::time::sleep(2 * TTL).await;
    expect_error(invoke(&apps[1].url, KEY, 16).await, 429, "rate_limited").await;

    signal(Some(apps[0].pid()), libc::SIGKILL);
    let killed = Instant::now();
    wait_until(
        "the killed replica's lease expires",
        TTL + Duration::from_secs(3),
        || async { invoke(&apps[1].url, KEY, 16).await.status() == 200 },
    )
    .await;
    assert!(killed.elapsed() >= TTL / 2, "the lease outlived the kill");
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn a_replica_stopped_gracefully_releases_its_leases_at_once() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut apps = replicas(2, || {
        TestApp::new()
            .settings("shutdown_grace = \"1s\"")
            .api_key("team-a", KEY, "concurrent_streams = 1")
            .redis(&url)
            .cluster("lease_ttl = \"5m\"")
            .scenario(LLAMA_ID, Scenario::reply(["t"; 20]))
    })
    .await;
    for app in &apps {
        wait_for_redis(&app.url, "ok").await;
    }
    let _held = hold_a_stream(&apps[0], 16).await;
    expect_error(invoke(&apps[1].url, KEY, 16).await, 429, "rate_limited").await;
    apps[0].terminate();
    apps[0].exit_code(Duration::from_secs(10)).await;
    // The stream ended at the grace period; its lease went with it, not 5 minutes later.
    assert_eq!(invoke(&apps[1].url, KEY, 16).await.status(), 200);
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn with_redis_down_and_on_redis_error_allow_requests_are_served_logged_and_counted_then_limits_return()
 {
    let mut redis = RedisServer::start().await;
    let apps = sharing(&redis, 2, "requests_per_minute = 2", "").await;
    let balancer = Balancer::start(&apps).await;
    // Load through the balancer across the outage and the restart: never refused.
    let load = tokio::spawn({
        let url = balancer.url.clone();
        async move {
            let mut statuses = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(4) {
                statuses.push(invoke(&url, BUSY_KEY, 16).await.status().as_u16());
            }
            statuses
        }
    });
    redis.stop().await;
    for app in &apps {
        wait_for_redis(&app.url, "unreachable").await;
    }
    for _ in 0..4 {
        assert_eq!(
            invoke(&apps[0].url, KEY, 16).await.status(),
            200,
            "served without the limits"
        );
    }
    // A Redis that does not answer at all costs a request no more than `redis_timeout`.
    redis.restart().await;
    for app in &apps {
        wait_for_redis(&app.url, "ok").await;
    }
    redis.pause();
    let started = Instant::now();
    assert_eq!(invoke(&apps[1].url, BUSY_KEY, 16).await.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    redis.resume();

    for app in &apps {
        wait_for_redis(&app.url, "ok").await;
    }
    let statuses = load.await.unwrap();
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    for app in &apps {
        assert!(app.logs().contains("REDIS UNAVAILABLE"), "{}", app.logs());
    }
    let metrics = apps[0].metrics(Some(KEY)).await;
    assert!(
        metrics.contains(r#"modelgate_redis_errors_total{operation="admit"}"#),
        "{metrics}"
    );
    // The restarted Redis is empty: the key gets its 2 per minute again, in all.
    assert_eq!(invoke(&apps[0].url, KEY, 16).await.status(), 200);
    assert_eq!(invoke(&apps[1].url, KEY, 16).await.status(), 200);
    expect_error(invoke(&apps[0].url, KEY, 16).await, 429, "rate_limited").await;
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn with_redis_down_and_on_redis_error_deny_limited_keys_get_503_until_it_is_back() {
    let mut redis = RedisServer::start().await;
    let apps = sharing(
        &redis,
        1,
        "requests_per_minute = 100",
        "on_redis_error = \"deny\"",
    )
    .await;
    assert_eq!(invoke(&apps[0].url, KEY, 16).await.status(), 200);
    redis.stop().await;
    let refused = invoke(&apps[0].url, KEY, 16).await;
    assert!(refused.headers().contains_key("retry-after"));
    let message = expect_error(refused, 503, "limits_unavailable").await;
    assert!(message.contains("per-key limits"), "{message}");
    let (status, body, _) = crate::cluster::health(&apps[0].url).await;
    assert_eq!((status, &body["redis"]), (200, &json!("unreachable")));

    redis.restart().await;
    wait_until(
        "requests are served again",
        Duration::from_secs(5),
        || async { invoke(&apps[0].url, KEY, 16).await.status() == 200 },
    )
    .await;
}

#[tokio::test]
async fn without_redis_a_budget_holds_in_the_one_process() {
    let app = TestApp::new()
        .api_key("team-a", KEY, "tokens_per_month = 100")
        .spawn()
        .await;
    let refused = invoke(&app.url, KEY, 101).await;
    let wait = retry_after(&refused);
    assert!((1..=31 * 86_400).contains(&wait), "until the 1st: {wait}");
    let message = expect_error(refused, 429, "budget_exhausted").await;
    assert!(
        message.contains("100 of its 100 tokens_per_month left"),
        "{message}"
    );
    let used = used_tokens(invoke(&app.url, KEY, 60).await).await;
    expect_error(
        invoke(&app.url, KEY, 100 - used + 1).await,
        429,
        "budget_exhausted",
    )
    .await;
    wait_until(
        "what is left fits once settled",
        Duration::from_secs(5),
        || async { invoke(&app.url, KEY, 100 - used).await.status() == 200 },
    )
    .await;
}
