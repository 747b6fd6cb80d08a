//! The HTTP front over real HTTP/1.1 on loopback: OpenAI's embeddings API and TEI's
//! `/embed` give DoExchange's vectors, errors come in OpenAI's shape with the status that
//! fits, and bearer tokens are checked like Flight's.

use std::io::{Read, Write};
use std::net::SocketAddr;

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use base64::Engine as _;
use keel_server::config::{AuthMode, Secret};
use serde_json::{Value, json};

use crate::common::{TestServer, action, embed_path, exchange, repo_root, text_batch};

/// One request on its own connection: (status, body as JSON or a string).
fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A body over the limit may be refused before it is all sent.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let payload = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let value = serde_json::from_str(payload).unwrap_or(Value::String(payload.to_string()));
    (status, value)
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    call(addr, "POST", path, token, body.to_string().as_bytes())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embeddings_match_flight_and_count_tokens() {
    let server = TestServer::start(|_| {}).await;
    let addr = server.http_addr;
    let texts = [
        "BRCA1 frameshift_variant",
        "TP53 chr17:7673802 C>T missense_variant",
    ];
    let mut client = server.client().await;
    let out = exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&texts.map(Some))],
    )
    .await
    .unwrap();
    let column = out[0]
        .column_by_name("embedding")
        .unwrap()
        .as_fixed_size_list();
    let flight: Vec<Vec<f32>> = (0..2)
        .map(|i| {
            column
                .value(i)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec()
        })
        .collect();
    let model = "all-MiniLM-L6-v2";
    let body = tokio::task::spawn_blocking(move || {
        let one = post(
            addr,
            "/v1/embeddings",
            None,
            json!({"model": model, "input": texts[0]}),
        );
        let many = post(
            addr,
            "/v1/embeddings",
            None,
            json!({"model": model, "input": texts}),
        );
        let b64 = post(
            addr,
            "/v1/embeddings",
            None,
            json!({"model": model, "input": texts, "encoding_format": "base64"}),
        );
        let cut = post(
            addr,
            "/v1/embeddings",
            None,
            json!({"model": model, "input": texts[1], "dimensions": 128}),
        );
        let tei = post(addr, "/embed", None, json!({"inputs": texts}));
        (one, many, b64, cut, tei)
    })
    .await
    .unwrap();
    let (one, many, b64, cut, tei) = body;
    assert_eq!(one.0, 200, "{}", one.1);
    assert_eq!(one.1["object"], "list");
    assert_eq!(one.1["model"], model);
    let v = floats(&one.1["data"][0]["embedding"]);
    assert!(cosine(&v, &flight[0]) >= 0.99999);
    let spec =
        keel_model::ModelSpec::from_dir(&repo_root().join("models/all-MiniLM-L6-v2")).unwrap();
    let tokenizer = keel_model::TextTokenizer::load(
        &repo_root().join("models/all-MiniLM-L6-v2/tokenizer.json"),
        spec.max_seq_length,
        spec.vocab_size,
    )
    .unwrap();
    let count = |t: &str| tokenizer.encode(t).unwrap().len() as u64;
    assert_eq!(one.1["usage"]["prompt_tokens"], count(texts[0]));
    assert_eq!(many.0, 200);
    assert_eq!(
        many.1["usage"]["total_tokens"],
        count(texts[0]) + count(texts[1])
    );
    for (i, d) in many.1["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["index"], i);
        assert!(cosine(&floats(&d["embedding"]), &flight[i]) >= 0.99999);
    }
    assert_eq!(b64.0, 200);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.1["data"][1]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(decoded, floats(&many.1["data"][1]["embedding"]));
    assert_eq!(cut.0, 200);
    let c = floats(&cut.1["data"][0]["embedding"]);
    assert_eq!(c.len(), 128);
    assert!((c.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
    assert!(cosine(&c, &flight[1][..128]) >= 0.99999);
    assert_eq!(tei.0, 200);
    assert!(cosine(&floats(&tei.1[1]), &flight[1]) >= 0.99999);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_error_has_its_status_and_openai_shape() {
    let server = TestServer::start(|s| {
        s.http.max_inputs = 4;
        s.http.max_body_bytes = 64 * 1024;
    })
    .await;
    let addr = server.http_addr;
    tokio::task::spawn_blocking(move || {
        let m = "all-MiniLM-L6-v2";
        // (what, the answer, the status expected, the `param` expected)
        type Case<'a> = (&'a str, (u16, Value), u16, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "an unknown model",
                post(
                    addr,
                    "/v1/embeddings",
                    None,
                    json!({"model": "gpt-x", "input": "a"}),
                ),
                404,
                Some("model"),
            ),
            (
                "bad JSON",
                call(addr, "POST", "/v1/embeddings", None, b"{not json"),
                400,
                None,
            ),
            (
                "an empty list",
                post(
                    addr,
                    "/v1/embeddings",
                    None,
                    json!({"model": m, "input": []}),
                ),
                400,
                Some("input"),
            ),
            (
                "too many inputs",
                post(
                    addr,
                    "/v1/embeddings",
                    None,
                    json!({"model": m, "input": ["a", "b", "c", "d", "e"]}),
                ),
                400,
                Some("input"),
            ),
            (
                "dimensions over the model's",
                post(
                    addr,
                    "/v1/embeddings",
                    None,
                    json!({"model": m, "input": "a", "dimensions": 385}),
                ),
                400,
                Some("dimensions"),
            ),
            (
                "an unknown encoding",
                post(
                    addr,
                    "/v1/embeddings",
                    None,
                    json!({"model": m, "input": "a", "encoding_format": "int4"}),
                ),
                400,
                Some("encoding_format"),
            ),
            (
                "a body over http.max_body_bytes",
                call(addr, "POST", "/v1/embeddings", None, &vec![b' '; 10 << 20]),
                413,
                None,
            ),
            (
                "an unknown route",
                call(addr, "GET", "/v2/nothing", None, b""),
                404,
                None,
            ),
            (
                "a route's wrong method",
                call(addr, "GET", "/v1/embeddings", None, b""),
                405,
                None,
            ),
        ];
        for (what, (status, body), expected, param) in cases {
            assert_eq!(status, expected, "{what}: {body}");
            let error = &body["error"];
            assert!(error["message"].is_string(), "{what}: {body}");
            assert!(error["type"].is_string(), "{what}: {body}");
            if let Some(p) = param {
                assert_eq!(error["param"], p, "{what}: {body}");
            }
        }
        let long = "gene ".repeat(2000);
        let (status, body) = post(
            addr,
            "/embed",
            None,
            json!({"inputs": long, "truncate": false}),
        );
        assert_eq!(status, 413, "{body}");
        let fits = "gene ".repeat(200);
        let (status, body) = post(
            addr,
            "/embed",
            None,
            json!({"inputs": [fits, "BRCA1"], "truncate": false}),
        );
        assert_eq!(
            status, 200,
            "texts within the limit pass truncate: false: {body}"
        );
        let (status, _) = post(addr, "/embed", None, json!({"inputs": long}));
        assert_eq!(status, 200, "a long text is truncated like Flight's");
        let (status, body) = call(addr, "GET", "/health", None, b"");
        assert_eq!((status, body), (200, Value::String("ok\n".into())));
        let (status, models) = call(addr, "GET", "/v1/models", None, b"");
        assert_eq!(status, 200);
        assert_eq!(models["data"][0]["id"], m);
        let (status, info) = call(addr, "GET", "/info", None, b"");
        assert_eq!(status, 200);
        assert_eq!(info["dimensions"], 384);
        assert_eq!(info["max_input_tokens"], 256);
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_front_checks_flights_bearer_tokens() {
    let token = "correct horse battery staple";
    let server = TestServer::start(|s| {
        s.auth.mode = AuthMode::Token;
        s.auth.tokens = vec![Secret::new(token)];
    })
    .await;
    let addr = server.http_addr;
    tokio::task::spawn_blocking(move || {
        let body = json!({"model": "all-MiniLM-L6-v2", "input": "BRCA1"});
        let (status, refused) = post(addr, "/v1/embeddings", None, body.clone());
        assert_eq!(status, 401, "{refused}");
        assert_eq!(refused["error"]["type"], "authentication_error");
        assert_eq!(
            post(addr, "/v1/embeddings", Some("wrong"), body.clone()).0,
            401
        );
        assert_eq!(post(addr, "/v1/embeddings", Some(token), body).0, 200);
        // Probes carry no credentials.
        assert_eq!(call(addr, "GET", "/health", None, b"").0, 200);
    })
    .await
    .unwrap();
    server.stop().await;
}

/// `POST /v1/search` is the `search` action over HTTP: the stored rows nearest a text, and
/// Flight's statuses as HTTP's (400 a bad body or k, 404 an unknown dataset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_over_http_finds_what_the_action_finds() {
    use futures::TryStreamExt;
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let texts = [
        "BRCA1 chr17:43045712 G>A missense_variant",
        "TP53 chr17:7674220 C>T stop_gained",
        "CFTR chr7:117559590 ATCT>A inframe_deletion",
    ];
    let rows: Vec<Option<&str>> = texts.iter().map(|t| Some(*t)).collect();
    let descriptor =
        arrow_flight::FlightDescriptor::new_path(vec!["datasets".into(), "genes".into()]);
    let put = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor))
        .build(futures::stream::iter([Ok(text_batch(&rows))]));
    let acks: Vec<_> = client
        .do_put(put)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(!acks.is_empty());
    let addr = server.http_addr;
    let body = json!({"dataset": "genes", "text": "TP53 stop_gained", "k": 2});
    let via_action = crate::common::action(&mut client, "search", &body.to_string()).await;
    let (status, found) = tokio::task::spawn_blocking(move || post(addr, "/v1/search", None, body))
        .await
        .unwrap();
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["results"][0]["text"], texts[1], "{found}");
    assert_eq!(found["results"], via_action["results"]);
    let cases = [
        (json!({"dataset": "genes"}), 400),
        (json!({"dataset": "genes", "text": "x", "k": 0}), 400),
        (json!({"dataset": "nowhere", "text": "x", "k": 1}), 404),
    ];
    for (body, expected) in cases {
        let (status, answer) =
            tokio::task::spawn_blocking(move || post(addr, "/v1/search", None, body))
                .await
                .unwrap();
        assert_eq!(status, expected, "{answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    server.stop().await;
}

/// The front and Flight are one engine: a text embedded over HTTP is a cache hit for a
/// later HTTP request and for a DoExchange, and a text a DoExchange embedded is a hit
/// over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_flight_share_one_cache() {
    let server = TestServer::start(|_| {}).await;
    let addr = server.http_addr;
    let mut client = server.client().await;
    let hits = |s: &Value| s["cache"]["hits"].as_u64().unwrap();
    let first = "LDLR chr19:11113380 G>A missense_variant (shared cache)";
    let body = json!({"model": "all-MiniLM-L6-v2", "input": first});
    let (status, _) = tokio::task::spawn_blocking({
        let body = body.clone();
        move || post(addr, "/v1/embeddings", None, body)
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    let before = hits(&action(&mut client, "stats", "").await);
    let (status, _) = tokio::task::spawn_blocking(move || post(addr, "/v1/embeddings", None, body))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let after_http = hits(&action(&mut client, "stats", "").await);
    assert_eq!(after_http, before + 1, "the second HTTP request hit");
    exchange(&mut client, embed_path(), vec![text_batch(&[Some(first)])])
        .await
        .unwrap();
    let after_flight = hits(&action(&mut client, "stats", "").await);
    assert_eq!(after_flight, after_http + 1, "DoExchange hit HTTP's vector");

    let second = "APOE chr19:44908684 T>C missense_variant (shared cache)";
    exchange(&mut client, embed_path(), vec![text_batch(&[Some(second)])])
        .await
        .unwrap();
    let before = hits(&action(&mut client, "stats", "").await);
    let (status, _) = tokio::task::spawn_blocking(move || {
        post(addr, "/embed", None, json!({"inputs": [second]}))
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    let after = hits(&action(&mut client, "stats", "").await);
    assert_eq!(after, before + 1, "TEI's /embed hit DoExchange's vector");
    server.stop().await;
}

/// Clients that leave mid-body, 200 requests at once, and an engine saturated past
/// `http.queue_timeout_ms`: every answer is a status (never a hung connection), a
/// saturated one is 503 with `Retry-After`, and the server is healthy after all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_survives_departures_crowds_and_saturation() {
    let server = TestServer::start(|s| s.http.queue_timeout_ms = 60_000).await;
    let addr = server.http_addr;
    tokio::task::spawn_blocking(move || {
        // 20 clients announce 1 MB and leave after 10 KB.
        for _ in 0..20 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let head = "POST /v1/embeddings HTTP/1.1\r\nHost: keel\r\n\
                        Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n";
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&[b' '; 10 * 1024]).unwrap();
            drop(s);
        }
        // 200 requests at once, 40 distinct texts among them.
        let threads: Vec<_> = (0..200)
            .map(|i| {
                std::thread::spawn(move || {
                    post(
                        addr,
                        "/v1/embeddings",
                        None,
                        json!({"model": "all-MiniLM-L6-v2",
                               "input": format!("GENE{} crowd request missense_variant", i % 40)}),
                    )
                })
            })
            .collect();
        let mut statuses = std::collections::BTreeMap::new();
        for t in threads {
            let (status, body) = t.join().unwrap();
            if status == 200 {
                assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 384);
            }
            *statuses.entry(status).or_insert(0) += 1;
        }
        assert_eq!(
            statuses.get(&200),
            Some(&200),
            "every request answered: {statuses:?}"
        );
        let (status, _) = call(addr, "GET", "/health", None, b"");
        assert_eq!(status, 200, "healthy after the crowd");
    })
    .await
    .unwrap();
    let stats = action(&mut server.client().await, "stats", "").await;
    assert_eq!(
        stats["in_flight_rows"], 0,
        "nothing left in flight: {stats}"
    );
    server.stop().await;

    // An engine that cannot answer within 1 ms: 503, Retry-After, OpenAI's shape.
    let server = TestServer::start(|s| s.http.queue_timeout_ms = 1).await;
    let addr = server.http_addr;
    tokio::task::spawn_blocking(move || {
        let texts: Vec<String> = (0..64)
            .map(|i| format!("saturated {i} BRCA2 chr13:32316461 A>G"))
            .collect();
        let body = json!({"model": "all-MiniLM-L6-v2", "input": texts}).to_string();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
        assert!(
            raw.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
            "{raw}"
        );
        assert!(raw.contains("http.queue_timeout_ms"), "{raw}");
        let (status, _) = call(addr, "GET", "/health", None, b"");
        assert_eq!(status, 200);
    })
    .await
    .unwrap();
    server.stop().await;
}

/// A client that announced a body and sends it slowly does not hold the server's shutdown
/// up past server.shutdown_grace_ms; /metrics has the request time as a histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_does_not_hold_shutdown_and_request_times_are_a_histogram() {
    let server = TestServer::start(|s| s.server.shutdown_grace_ms = 500).await;
    let (addr, metrics) = (server.http_addr, server.metrics_addr);
    let held = tokio::task::spawn_blocking(move || {
        let (status, body) = post(
            addr,
            "/v1/embeddings",
            None,
            json!({"model": "all-MiniLM-L6-v2", "input": "BRCA1 missense"}),
        );
        assert_eq!(status, 200, "{body}");
        let (_, text) = call(metrics, "GET", "/metrics", None, b"");
        let text = text.as_str().unwrap_or_default().to_string();
        assert!(
            text.contains("# TYPE keel_http_request_seconds histogram")
                && text.contains("keel_http_request_seconds_bucket"),
            "{text}"
        );
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{",
        )
        .unwrap();
        s
    })
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tokio::time::timeout(std::time::Duration::from_secs(15), server.stop())
        .await
        .expect("the server stops within its grace period, slow body or not");
    drop(held);
}
