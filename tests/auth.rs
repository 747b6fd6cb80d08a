//! Authentication and TLS over real Flight: only holders of a token get in; basic
//! credentials trade for a token in `Handshake`; TLS with a generated certificate.

use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightClient, HandshakeRequest};
use base64::Engine as _;
use futures::TryStreamExt;
use keel_server::config::{AuthMode, BasicUser, Secret};
use tonic::Code;

use crate::common::{TestServer, embed_path, exchange, text_batch};

async fn channel(server: &TestServer) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Every kind of call a client can make, with `client`'s headers: the codes they end with.
async fn every_call(client: &mut FlightClient) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let status = crate::common::to_status;
    vec![
        (
            "do_exchange",
            exchange(client, embed_path(), vec![text_batch(&[Some("auth")])])
                .await
                .map(|_| ()),
        ),
        (
            "do_action",
            match client
                .do_action(arrow_flight::Action::new("stats", Vec::<u8>::new()))
                .await
            {
                Ok(s) => s.try_collect::<Vec<_>>().await.map(|_| ()).map_err(status),
                Err(e) => Err(status(e)),
            },
        ),
        (
            "list_flights",
            match client.list_flights(Vec::<u8>::new()).await {
                Ok(s) => s.try_collect::<Vec<_>>().await.map(|_| ()).map_err(status),
                Err(e) => Err(status(e)),
            },
        ),
        (
            "list_actions",
            match client.list_actions().await {
                Ok(s) => s.try_collect::<Vec<_>>().await.map(|_| ()).map_err(status),
                Err(e) => Err(status(e)),
            },
        ),
        (
            "do_get",
            // An unknown dataset: NotFound once let in.
            match client.do_get(arrow_flight::Ticket::new("none")).await {
                Ok(s) => s.try_collect::<Vec<_>>().await.map(|_| ()).map_err(status),
                Err(e) => Err(status(e)),
            },
        ),
    ]
}

fn assert_all_unauthenticated(results: Vec<(&str, Result<(), tonic::Status>)>) {
    for (call, r) in results {
        let err = r.expect_err(call);
        assert_eq!(err.code(), Code::Unauthenticated, "{call}: {err:?}");
    }
}

fn assert_all_let_in(results: Vec<(&str, Result<(), tonic::Status>)>) {
    for (call, r) in results {
        if let Err(e) = r {
            assert_eq!(e.code(), Code::NotFound, "{call}: {e:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_lets_in_only_configured_tokens() {
    let server = TestServer::start(|s| {
        s.auth.mode = AuthMode::Token;
        s.auth.tokens = vec![Secret::new("correct horse battery staple")];
    })
    .await;
    let mut anonymous = FlightClient::new(channel(&server).await);
    assert_all_unauthenticated(every_call(&mut anonymous).await);
    let mut wrong = FlightClient::new(channel(&server).await);
    wrong
        .add_header("authorization", "Bearer correct horse battery stapl")
        .unwrap();
    assert_all_unauthenticated(every_call(&mut wrong).await);
    let mut right = FlightClient::new(channel(&server).await);
    right
        .add_header("authorization", "Bearer correct horse battery staple")
        .unwrap();
    assert_all_let_in(every_call(&mut right).await);
    // Secrets are redacted wherever settings are printed or reported.
    let printed = serde_json::to_string(&server.settings).unwrap();
    assert!(!printed.contains("battery"), "{printed}");
    assert!(!format!("{:?}", server.settings).contains("battery"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_trade_for_a_bearer_token_in_the_handshake() {
    let server = TestServer::start(|s| {
        s.auth.mode = AuthMode::Basic;
        s.auth.users = vec![BasicUser {
            username: "alice".into(),
            password: Secret::new("wonderland"),
        }];
    })
    .await;
    let handshake = |user: &'static str, pass: &'static str| {
        let server_addr = server.addr;
        async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{server_addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut raw = FlightServiceClient::new(channel);
            let mut request =
                tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            request
                .metadata_mut()
                .insert("authorization", format!("Basic {basic}").parse().unwrap());
            raw.handshake(request).await
        }
    };
    let err = handshake("alice", "looking-glass").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(!err.message().contains("looking-glass"));
    let response = handshake("alice", "wonderland").await.unwrap();
    let header = response
        .metadata()
        .get("authorization")
        .expect("the token comes back in the authorization header")
        .to_str()
        .unwrap()
        .to_string();
    let token = header.strip_prefix("Bearer ").unwrap().to_string();
    let payload = response
        .into_inner()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .remove(0)
        .payload;
    assert_eq!(payload, token.as_bytes());

    let mut anonymous = FlightClient::new(channel(&server).await);
    assert_all_unauthenticated(every_call(&mut anonymous).await);
    let mut holder = FlightClient::new(channel(&server).await);
    holder
        .add_header("authorization", &format!("Bearer {token}"))
        .unwrap();
    assert_all_let_in(every_call(&mut holder).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_generated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = TestServer::start(|s| {
        s.server.tls.cert = Some(cert_path.clone());
        s.server.tls.key = Some(key_path.clone());
    })
    .await;
    let port = server.addr.port();
    let auth = keel_client::flight::ClientAuth {
        token: None,
        tls_ca: Some(cert_path.clone()),
    };
    let mut client = keel_client::flight::connect_with(
        &format!("grpc+tls://localhost:{port}"),
        Duration::from_secs(10),
        &auth,
    )
    .await
    .unwrap();
    let out = exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("over TLS")])],
    )
    .await
    .unwrap();
    assert_eq!(out[0].num_rows(), 1);
    // Plain text to a TLS server gets nowhere: refused, or never answered (bounded here,
    // so that a client left waiting cannot hang the test).
    let plain = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = tonic::transport::Channel::from_shared(format!("http://localhost:{port}"))
            .unwrap()
            .connect()
            .await;
        match channel {
            Ok(channel) => {
                let mut c = FlightClient::new(channel);
                exchange(&mut c, embed_path(), vec![text_batch(&[Some("plain")])])
                    .await
                    .is_ok()
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(
        !matches!(plain, Ok(true)),
        "a plain-text exchange got an answer"
    );
    // ... and the server goes on serving TLS clients.
    let out = exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("over TLS, again")])],
    )
    .await
    .unwrap();
    assert_eq!(out[0].num_rows(), 1);
    server.stop().await;
}
