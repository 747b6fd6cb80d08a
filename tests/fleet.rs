//! A fleet's shared cache: engines sharing one real redis-server (Debian's, started here on
//! a free loopback port), and the standard gRPC health service that orchestrators probe.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow_array::{Array, FixedSizeListArray, Float32Array, RecordBatch};
use keel_server::config::Settings;

#[cfg(feature = "gpu")]
use crate::common::tiny_bert;
use crate::common::{TestServer, action, embed_path, exchange, text_batch};

/// A redis-server of its own: no persistence, killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port, and waits until it answers PING.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect(
                "redis-server runs (scripts/test.sh installs it: apt-get install redis-server)",
            );
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn shared(url: &str) -> impl FnOnce(&mut Settings) + use<> {
    let url = url.to_string();
    move |s: &mut Settings| {
        s.cache.shared.url = Some(url);
        s.cache.shared.breaker_open_ms = 300;
        // A loaded CI machine can stall a loopback round trip for long: a lookup timing
        // out would turn an expected hit into a miss.
        s.cache.shared.timeout_ms = 3000;
    }
}

fn texts(tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{tag} chr1:{} G>A missense_variant GENE{}",
                1000 + i,
                i % 17
            )
        })
        .collect()
}

/// The vectors of `texts` through a server (one DoExchange, batches of 50).
async fn embed(server: &TestServer, texts: &[String]) -> Vec<Vec<f32>> {
    let mut client = server.client().await;
    let batches: Vec<RecordBatch> = texts
        .chunks(50)
        .map(|c| text_batch(&c.iter().map(|t| Some(t.as_str())).collect::<Vec<_>>()))
        .collect();
    let out = exchange(&mut client, embed_path(), batches).await.unwrap();
    vectors(&out)
}

fn vectors(batches: &[RecordBatch]) -> Vec<Vec<f32>> {
    let mut all = Vec::new();
    for b in batches {
        let list = b
            .column_by_name("embedding")
            .unwrap()
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap();
        for i in 0..list.len() {
            let v = list.value(i);
            let v = v.as_any().downcast_ref::<Float32Array>().unwrap();
            all.push(v.values().to_vec());
        }
    }
    all
}

async fn stats(server: &TestServer) -> serde_json::Value {
    action(&mut server.client().await, "stats", "").await
}

/// Waits until the server has written `n` vectors back to Redis.
async fn written(server: &TestServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = stats(server).await;
        if s["cache"]["shared"]["writes"].as_u64().unwrap() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "writes never reached {n}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_gets_the_first_ones_vectors_from_redis_bit_for_bit() {
    let redis = Redis::start();
    let first = TestServer::start(shared(&redis.url())).await;
    let second = TestServer::start(shared(&redis.url())).await;
    let rows = texts("fleet", 120);

    let a = embed(&first, &rows).await;
    assert_eq!(stats(&first).await["embedded_rows"], 120);
    written(&first, 120).await;

    let b = embed(&second, &rows).await;
    let s = stats(&second).await;
    assert_eq!(s["embedded_rows"], 0, "every row was a shared hit: {s}");
    assert_eq!(s["cache"]["shared"]["hits"], 120);
    assert_eq!(s["cache"]["shared"]["errors"], 0);
    assert_eq!(a, b, "vectors from Redis are bit-identical");
    // They went into the second's first level too: another pass asks Redis nothing.
    embed(&second, &rows).await;
    let again = stats(&second).await;
    assert_eq!(again["cache"]["shared"]["hits"], 120);
    assert_eq!(again["cache"]["hits"], 120);

    for server in [first, second] {
        server.stop().await;
    }
}

/// The cache key carries the model's weights: another model's vectors are never served.
#[cfg(feature = "gpu")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_model_on_the_same_redis_gets_no_hit() {
    let redis = Redis::start();
    let first = TestServer::start(shared(&redis.url())).await;
    let rows = texts("models", 60);
    embed(&first, &rows).await;
    written(&first, 60).await;
    // Another model on the same Redis gets no hit.
    let model = tiny_bert();
    let other = TestServer::start(|s| {
        shared(&redis.url())(s);
        s.embedder.model_dir = model.path().to_path_buf();
    })
    .await;
    embed(&other, &rows).await;
    let s = stats(&other).await;
    assert_eq!(s["embedded_rows"], 60, "{s}");
    assert_eq!(s["cache"]["shared"]["hits"], 0);
    assert_eq!(s["cache"]["shared"]["misses"], 60);
    for server in [first, other] {
        server.stop().await;
    }
}

/// The cache key carries the arithmetic: the same model computed in f16 on the GPU backend
/// (Mesa's software Vulkan here) is never served the CPU backend's f32 vectors, nor the
/// reverse.
#[cfg(feature = "gpu")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_precision_on_the_same_redis_gets_no_hit() {
    let redis = Redis::start();
    let model = tiny_bert();
    let dir = model.path().to_path_buf();
    let cpu = TestServer::start({
        let dir = dir.clone();
        let url = redis.url();
        move |s| {
            shared(&url)(s);
            s.embedder.model_dir = dir;
        }
    })
    .await;
    let rows = texts("precision", 40);
    embed(&cpu, &rows).await;
    written(&cpu, 40).await;
    let f16 = TestServer::start(|s| {
        shared(&redis.url())(s);
        s.embedder.model_dir = dir.clone();
        s.embedder.backend = keel_engine::embedder::config::Backends::Wgpu;
        s.embedder.gpu.allow_software = true;
        s.embedder.gpu.precision = keel_model::Precision::F16;
        s.embedder.gpu.max_batch_rows = 8;
        s.embedder.gpu.max_batch_tokens = 256;
        // Only the shapes these 40 rows need are compiled (on lavapipe every shape of
        // the warm-up costs seconds); what the warm-up does is tested in gpu.rs.
        s.embedder.gpu.warm_up = false;
    })
    .await;
    let mut client = f16.client().await;
    let deadline = Instant::now() + Duration::from_secs(240);
    while keel_client::flight::action::<serde_json::Value>(&mut client, "health", Vec::new())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the f16 replica never warmed up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    embed(&f16, &rows).await;
    let s = stats(&f16).await;
    assert_eq!(s["embedded_rows"], 40, "{s}");
    assert_eq!(s["cache"]["shared"]["hits"], 0, "{s}");
    for server in [cpu, f16] {
        server.stop().await;
    }
}

/// Three replicas missing the same new texts at the same moment embed each text once
/// between them: one leases it in Redis, the others wait for its vector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_missing_the_same_texts_at_once_embed_each_once_fleet_wide() {
    let redis = Redis::start();
    let servers = [
        TestServer::start(shared(&redis.url())).await,
        TestServer::start(shared(&redis.url())).await,
        TestServer::start(shared(&redis.url())).await,
    ];
    let rows = texts("lease", 300);
    // Each replica takes the rows in another order, so that every replica both leases
    // texts and waits for others'.
    let orders: Vec<Vec<String>> = (0..3)
        .map(|r| {
            let mut o = rows.clone();
            o.rotate_left(r * 100);
            o
        })
        .collect();
    let results = futures::future::join_all(
        servers
            .iter()
            .zip(&orders)
            .map(|(server, order)| embed(server, order)),
    )
    .await;
    let mut embedded = 0;
    let mut waited = 0;
    for server in &servers {
        let s = stats(server).await;
        embedded += s["embedded_rows"].as_u64().unwrap();
        waited += s["cache"]["shared"]["waited"].as_u64().unwrap();
        assert_eq!(s["cache"]["shared"]["errors"], 0, "{s}");
        assert_eq!(s["cache"]["shared"]["timeouts"], 0, "{s}");
    }
    assert_eq!(embedded, 300, "each distinct text embedded once fleet-wide");
    assert!(waited > 0, "some replica waited for another's lease");
    for (r, got) in results.iter().enumerate() {
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v, &results[0][(i + r * 100) % 300], "replica {r} row {i}");
        }
    }
    for server in servers {
        server.stop().await;
    }
}

/// A replica that died holding leases delays the fleet by one lease at most: a replica
/// waiting on those texts takes them over when the leases expire and embeds them itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_dead_replica_are_taken_over_when_they_expire() {
    let redis = Redis::start();
    let probe = TestServer::start(shared(&redis.url())).await;
    let rows = texts("takeover", 30);
    let expected = embed(&probe, &rows).await;
    written(&probe, 30).await;
    probe.stop().await;
    let server = TestServer::start(shared(&redis.url())).await;
    // Those texts' keys are what the probe wrote; make them look like a dead replica's
    // leases: no vector, a lease held by "dead" (no expiry until the test says so).
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("keel:v1:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 30, "{keys:?}");
    let leases: Vec<String> = keys
        .iter()
        .map(|k| format!("keel:v1:lease:{}", k.strip_prefix("keel:v1:").unwrap()))
        .collect();
    for (key, lease) in keys.iter().zip(&leases) {
        redis::cmd("DEL").arg(key).exec(&mut conn).unwrap();
        redis::cmd("SET")
            .arg(lease)
            .arg("dead")
            .exec(&mut conn)
            .unwrap();
    }
    let stream = tokio::spawn({
        let rows = rows.clone();
        let client = server.client().await;
        async move {
            let mut client = client;
            let batches = vec![text_batch(
                &rows.iter().map(|t| Some(t.as_str())).collect::<Vec<_>>(),
            )];
            vectors(&exchange(&mut client, embed_path(), batches).await.unwrap())
        }
    });
    // Once the server has found them busy, the leases expire (the dead replica's lease
    // time running out).
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(&server).await["cache"]["shared"]["misses"]
        .as_u64()
        .unwrap()
        < 30
    {
        assert!(Instant::now() < deadline, "the server never asked Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !stream.is_finished(),
        "the stream waits while the leases are held"
    );
    for lease in &leases {
        redis::cmd("PEXPIRE")
            .arg(lease)
            .arg(1)
            .exec(&mut conn)
            .unwrap();
    }
    let got = stream.await.unwrap();
    let s = stats(&server).await;
    assert_eq!(got, expected);
    let r = &s["cache"]["shared"];
    assert_eq!(r["taken_over"], 30, "{s}");
    assert_eq!(r["leased"], 0, "{s}");
    assert_eq!(s["embedded_rows"], 30, "{s}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_mid_stream_costs_no_row_and_hits_resume_when_it_is_back() {
    let mut redis = Redis::start();
    let server = TestServer::start(shared(&redis.url())).await;
    let plain = TestServer::start(|_| {}).await;
    let rows = texts("outage", 400);
    let expected = embed(&plain, &rows).await;

    // Kill Redis while the stream runs: batches of 50 with a pause between them.
    let mut client = server.client().await;
    let batches: Vec<RecordBatch> = rows
        .chunks(50)
        .map(|c| text_batch(&c.iter().map(|t| Some(t.as_str())).collect::<Vec<_>>()))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<RecordBatch>(1);
    let feeder = tokio::spawn(async move {
        for (i, b) in batches.into_iter().enumerate() {
            tx.send(b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(if i == 2 { 600 } else { 50 })).await;
        }
    });
    let input = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(embed_path()))
        .build(futures::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Ok,
        ));
    let replies = client.do_exchange(input).await.unwrap();
    let collect = tokio::spawn(futures::TryStreamExt::try_collect::<Vec<RecordBatch>>(
        replies,
    ));
    tokio::time::sleep(Duration::from_millis(250)).await;
    redis.kill();
    feeder.await.unwrap();
    let got = vectors(&collect.await.unwrap().unwrap());
    assert_eq!(got.len(), rows.len(), "every row came back");
    for (g, e) in got.iter().zip(&expected) {
        let diff = g
            .iter()
            .zip(e)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "a vector differs by {diff}");
    }
    let s = stats(&server).await;
    let r = &s["cache"]["shared"];
    let trouble = r["errors"].as_u64().unwrap()
        + r["timeouts"].as_u64().unwrap()
        + r["skipped"].as_u64().unwrap();
    assert!(trouble > 0, "the outage was counted: {r}");

    // Redis back on the same address: a fresh replica fills it, and the first one, never
    // restarted, finds those vectors there.
    redis.restart();
    let filler = TestServer::start(shared(&redis.url())).await;
    let fresh = texts("after", 100);
    embed(&filler, &fresh).await;
    written(&filler, 100).await;
    // The server finds Redis again on its own: new texts until a lookup is answered.
    let answered = |s: &serde_json::Value| {
        let r = &s["cache"]["shared"];
        r["hits"].as_u64().unwrap() + r["misses"].as_u64().unwrap()
    };
    let before = answered(&stats(&server).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        embed(&server, &texts(&format!("probe{round}"), 5)).await;
        if answered(&stats(&server).await) > before {
            break;
        }
        assert!(Instant::now() < deadline, "Redis was never asked again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hits_before = stats(&server).await["cache"]["shared"]["hits"]
        .as_u64()
        .unwrap();
    embed(&server, &fresh).await;
    let after = stats(&server).await;
    assert_eq!(
        after["cache"]["shared"]["hits"].as_u64().unwrap() - hits_before,
        100,
        "{after}"
    );
    for s in [server, plain, filler] {
        s.stop().await;
    }
}

/// `grpc.health.v1` on the Flight port, without credentials even when Flight needs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_service_says_serving_then_not_serving_while_draining() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let server = TestServer::start(|s| {
        s.auth.mode = keel_server::config::AuthMode::Token;
        s.auth.tokens = vec![keel_server::config::Secret::new("secret")];
        s.server.shutdown_grace_ms = 3000;
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = health.check(status("")).await.unwrap().into_inner();
        if r.status == ServingStatus::Serving as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = health
        .check(status("arrow.flight.protocol.FlightService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    let unknown = health.check(status("no.such.Service")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Draining: an open stream holds the server in its grace period.
    let mut flight = server.client().await;
    flight.add_header("authorization", "Bearer secret").unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<RecordBatch>(1);
    tx.send(text_batch(&[Some("held open")])).await.unwrap();
    let input = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(embed_path()))
        .build(futures::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Ok,
        ));
    let replies = flight.do_exchange(input).await.unwrap();
    let collect = tokio::spawn(futures::TryStreamExt::try_collect::<Vec<RecordBatch>>(
        replies,
    ));
    let stopping = tokio::spawn(server.stop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = health.check(status("")).await.unwrap().into_inner();
        if r.status == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never NOT_SERVING while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = health
        .check(status("arrow.flight.protocol.FlightService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ServingStatus::NotServing as i32);
    drop(tx);
    assert_eq!(collect.await.unwrap().unwrap()[0].num_rows(), 1);
    stopping.await.unwrap();
}

/// A text repeated within one stream's concurrent slices is embedded once: the slices
/// that miss it while it is being computed take that vector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_in_flight_are_embedded_once() {
    let server = TestServer::start(|_| {}).await;
    let distinct = texts("coalesce", 40);
    let rows: Vec<String> = (0..2000).map(|i| distinct[i % 40].clone()).collect();
    let got = embed(&server, &rows).await;
    let s = stats(&server).await;
    assert_eq!(s["embedded_rows"], 40, "{s}");
    let coalesced = s["coalesced_rows"].as_u64().unwrap();
    let hits = s["cache"]["hits"].as_u64().unwrap();
    assert!(
        coalesced > 0,
        "some slices waited for another's vector: {s}"
    );
    // 40 slices of 50 rows (the batches sent), 40 distinct texts each: of those 1 600
    // lookups, 40 were computed; every other one was a hit or took a vector in flight
    // (counted in rows, at least one per text).
    assert!(coalesced + hits >= 1600 - 40, "{s}");
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v, &got[i % 40], "row {i} has its text's vector");
    }
    server.stop().await;
}
