//! The HTTP front: OpenAI's embeddings API (`POST /v1/embeddings`, `GET /v1/models`) and
//! Text Embeddings Inference's `POST /embed`, the `search` action as `POST /v1/search`,
//! beside `GET /health` and `GET /info`, on the
//! same engine as Flight: the same cache keys, embedder queue (a request of few rows takes
//! the fast lane), in-flight bound and bearer tokens (`auth`).
//!
//! Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
//! the status that fits: 400 bad JSON, empty or too many inputs, bad dimensions; 401
//! without a valid token; 404 an unknown model or route; 413 a body over
//! `http.max_body_bytes` (or, with TEI's `truncate: false`, a text over the model's
//! limit); 503 with `Retry-After` when the engine is saturated past `http.queue_timeout_ms`
//! or shutting down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use keel_engine::ingest::IngestError;
use keel_model::{ModelSpec, TextTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::HttpConfig;
use crate::flight::auth::Auth;
use crate::state::ServerState;

/// What every handler shares.
struct Front {
    state: Arc<ServerState>,
    auth: Arc<Auth>,
    config: HttpConfig,
    /// The served model's name (`http.model_name`, default the model folder's name).
    model: String,
    /// Token counts for `usage` and TEI's `truncate: false`: the embedder's own tokenizer.
    tokenizer: TextTokenizer,
    max_tokens: usize,
}

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => "server_error",
            _ => "invalid_request_error",
        };
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("keel_http_errors_total", "status" => self.status.as_u16().to_string())
            .increment(1);
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        let mut response = json_response(self.status, &body);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// `value` as a JSON response with `status`.
fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        )
            .into_response(),
    }
}

/// Serves the HTTP front on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    auth: Arc<Auth>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = state.settings.http.clone();
    let tls = state.settings.server.tls.clone();
    let state_grace_ms = state.settings.server.shutdown_grace_ms;
    let model_dir = state.settings.embedder.model_dir.clone();
    let spec = ModelSpec::from_dir(&model_dir)?;
    let tokenizer = state.pipeline.embedder().tokenizer().clone();
    let model = config.model_name.clone().unwrap_or_else(|| {
        model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| state.pipeline.embedder().model_id().to_string())
    });
    let front = Arc::new(Front {
        max_tokens: spec.max_seq_length,
        state,
        auth,
        config,
        model,
        tokenizer,
    });
    let app = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(embeddings))
        .route("/embed", post(tei_embed))
        .route("/v1/models", get(models))
        .route("/v1/search", post(search))
        .route("/health", get(health))
        .route("/info", get(info))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; try POST /v1/embeddings, POST /embed, POST /v1/search, \
                 GET /v1/models, GET /health or GET /info",
            )
        })
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "{method} is not served on {}; POST /v1/embeddings, POST /embeddings, \
                     POST /embed and POST /v1/search, GET /v1/models, GET /health and GET /info",
                        uri.path()
                    ),
                )
            },
        )
        .with_state(front);
    // On shutdown open connections finish the request they are on, for at most the
    // grace period: a client sending its body slowly must not hold the server up.
    let grace = Duration::from_millis(state_grace_ms);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            serve_tls(listener, app, tls_config(cert, key)?, shutdown, grace).await
        }
        _ => {
            let begun = Arc::new(tokio::sync::Notify::new());
            let signal = {
                let begun = begun.clone();
                async move {
                    shutdown.await;
                    begun.notify_one();
                }
            };
            let serving = std::future::IntoFuture::into_future(
                axum::serve(listener, app).with_graceful_shutdown(signal),
            );
            tokio::select! {
                served = serving => served?,
                () = async {
                    begun.notified().await;
                    tokio::time::sleep(grace).await;
                } => tracing::warn!(
                    "HTTP front: connections still open {} ms after shutdown \
                     (server.shutdown_grace_ms); dropped",
                    grace.as_millis()
                ),
            }
            Ok(())
        }
    }
}

/// rustls' server configuration from PEM files (Flight's `server.tls`), HTTP/1.1 only.
fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("server.tls.cert: {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("server.tls.key: {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("server.tls: the certificate or key is not usable")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The front over TLS: each accepted connection is handshaken (10 s at most) and served
/// by hyper on its own task; on `shutdown` no connection is accepted and open ones finish
/// the request they are on (`grace` at most).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP front: accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, http, app, watcher) = (
            acceptor.clone(),
            http.clone(),
            app.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                tracing::debug!(%peer, "HTTP front: TLS handshake failed or timed out");
                return;
            };
            let connection =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %e, "HTTP front: connection ended");
            }
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "HTTP front: connections still open {} ms after shutdown (server.shutdown_grace_ms); dropped",
            grace.as_millis()
        );
    }
    Ok(())
}

/// `POST /v1/search`: the `search` action over HTTP, its JSON in and out
/// (`{"dataset", "text", "k", "mode", "rescore", "expansion"}`, docs/FLIGHT.md), the
/// query embedded through the same cache and queue; Flight's statuses become HTTP's.
async fn search(State(front): State<Arc<Front>>, request: Request) -> Response {
    let started = Instant::now();
    let result = async {
        front.authorize(request.headers())?;
        let body = front.body(request).await?;
        let max_k = front.state.settings.server.search_max_k;
        let action =
            crate::flight::actions::Action::parse("search", &body, max_k).map_err(from_status)?;
        let work = action.run(&front.state);
        let timeout = Duration::from_millis(front.config.queue_timeout_ms);
        match tokio::time::timeout(timeout, work).await {
            Ok(answer) => answer.map_err(from_status),
            Err(_) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the engine is saturated: no answer within http.queue_timeout_ms ({} ms); \
                     retry later",
                    front.config.queue_timeout_ms
                ),
            )),
        }
    }
    .await;
    match result {
        Ok(json) => {
            record("/v1/search", started, 1);
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                json,
            )
                .into_response()
        }
        Err(e) => {
            record("/v1/search", started, 0);
            e.into_response()
        }
    }
}

/// A Flight status as the HTTP error that means the same.
fn from_status(status: tonic::Status) -> ApiError {
    use tonic::Code;
    let http = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(http, status.message().to_string())
}

/// Records a request's route, latency and inputs.
fn record(route: &'static str, started: Instant, inputs: usize) {
    metrics::counter!("keel_http_requests_total", "route" => route).increment(1);
    metrics::counter!("keel_http_inputs_total", "route" => route).increment(inputs as u64);
    metrics::histogram!("keel_http_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
}

impl Front {
    /// The caller's bearer token, checked like Flight's.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            metadata.insert("authorization", value);
        }
        self.auth.check(&metadata).map_err(|s| {
            ApiError::new(StatusCode::UNAUTHORIZED, s.message().to_string()).code("invalid_api_key")
        })
    }

    /// The request's body, at most `http.max_body_bytes`.
    async fn body(&self, request: Request) -> Result<Bytes, ApiError> {
        axum::body::to_bytes(request.into_body(), self.config.max_body_bytes)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the body is over http.max_body_bytes ({} bytes) or was cut off: {e}",
                        self.config.max_body_bytes
                    ),
                )
            })
    }

    /// Vectors of `texts` (unit length), cut to `dimensions` and renormalised.
    async fn vectors(
        &self,
        texts: Vec<String>,
        dimensions: Option<usize>,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        let pipeline = &self.state.pipeline;
        let dim = pipeline.dim();
        let out_dim = match dimensions {
            None => dim,
            Some(d) if (1..=dim).contains(&d) => d,
            Some(d) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("dimensions must be within 1..={dim} (the model's), got {d}"),
                )
                .param("dimensions"));
            }
        };
        if self.state.is_closing() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        let n = texts.len();
        let work = async {
            let _in_flight = pipeline.admit(n).await?;
            pipeline.embed(texts.into_iter().map(Some).collect()).await
        };
        let timeout = Duration::from_millis(self.config.queue_timeout_ms);
        let (flat, _) = match tokio::time::timeout(timeout, work).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the engine is saturated: no answer within http.queue_timeout_ms \
                         ({} ms); retry later",
                        self.config.queue_timeout_ms
                    ),
                ));
            }
            Ok(Err(IngestError::ResourceExhausted(m) | IngestError::Unavailable(m))) => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m));
            }
            Ok(Err(IngestError::Internal(m))) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m));
            }
            Ok(Ok(v)) => v,
        };
        let vectors = flat
            .chunks_exact(dim)
            .map(|v| {
                let mut v = v[..out_dim].to_vec();
                if out_dim < dim {
                    keel_model::l2_normalize(&mut v);
                }
                v
            })
            .collect();
        Ok((vectors, out_dim))
    }

    /// Most texts in one request: `http.max_inputs`, and never more rows than may be in
    /// flight at once.
    fn max_inputs(&self) -> usize {
        let in_flight = self.state.settings.ingest.max_in_flight_rows;
        self.config.max_inputs.min(in_flight)
    }

    /// Tokens the model reads of `text`, `[CLS]` and `[SEP]` included (longer texts are
    /// cut, as Flight's are).
    fn read_tokens(&self, text: &str) -> usize {
        self.tokenizer.encode(text).map(|t| t.len()).unwrap_or(0)
    }

    /// Whether `text` is longer than the model reads.
    fn too_long(&self, text: &str) -> bool {
        self.tokenizer
            .encode_checked(text)
            .is_ok_and(|(_, cut)| cut)
    }
}

/// OpenAI's `input`: a string or a list of strings (token arrays are refused).
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    input: Input,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: serde_json::Value,
}

/// Parses a JSON body into `T`, or a 400 naming what is wrong.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], hint: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad request body ({e}); {hint}"),
        )
    })
}

/// Checks a list of inputs: not empty, no more than `http.max_inputs`.
fn checked(texts: Vec<String>, max: usize, param: &'static str) -> Result<Vec<String>, ApiError> {
    if texts.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the input is empty").param(param));
    }
    if texts.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{} inputs in one request; at most {max} (http.max_inputs, \
                 ingest.max_in_flight_rows)",
                texts.len()
            ),
        )
        .param(param));
    }
    Ok(texts)
}

/// `POST /v1/embeddings`: OpenAI's embeddings API.
async fn embeddings(State(front): State<Arc<Front>>, request: Request) -> Response {
    let started = Instant::now();
    let result = async {
        front.authorize(request.headers())?;
        let body = front.body(request).await?;
        let req: EmbeddingsRequest = parse(
            &body,
            "send {\"model\": NAME, \"input\": \"text\" or [\"text\", ...]}",
        )?;
        if req.model != front.model {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "The model `{}` does not exist; this server serves `{}`",
                    req.model, front.model
                ),
            )
            .param("model")
            .code("model_not_found"));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("encoding_format must be float or base64, got {other:?}"),
                )
                .param("encoding_format"));
            }
        };
        let texts = match req.input {
            Input::One(t) => vec![t],
            Input::Many(ts) => ts,
        };
        let texts = checked(texts, front.max_inputs(), "input")?;
        let tokens: usize = texts.iter().map(|t| front.read_tokens(t)).sum();
        let n = texts.len();
        let (vectors, _) = front.vectors(texts, req.dimensions).await?;
        let data: Vec<Embedding> = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| Embedding {
                object: "embedding",
                index,
                embedding: if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                },
            })
            .collect();
        Ok((
            n,
            json!({
                "object": "list",
                "data": data,
                "model": front.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }),
        ))
    }
    .await;
    match result {
        Ok((n, body)) => {
            record("/v1/embeddings", started, n);
            json_response(StatusCode::OK, &body)
        }
        Err(e) => {
            record("/v1/embeddings", started, 0);
            e.into_response()
        }
    }
}

/// TEI's `inputs`: a string or a list of strings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeiRequest {
    inputs: Input,
    /// The model's vectors are unit length already (its `Normalize` module).
    #[serde(default)]
    #[allow(dead_code)]
    normalize: Option<bool>,
    /// `false`: a text over the model's limit is refused instead of cut.
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<usize>,
}

/// `POST /embed`: Text Embeddings Inference's shape, a list of vectors.
async fn tei_embed(State(front): State<Arc<Front>>, request: Request) -> Response {
    let started = Instant::now();
    let result = async {
        front.authorize(request.headers())?;
        let body = front.body(request).await?;
        let req: TeiRequest = parse(&body, "send {\"inputs\": \"text\" or [\"text\", ...]}")?;
        let texts = match req.inputs {
            Input::One(t) => vec![t],
            Input::Many(ts) => ts,
        };
        let texts = checked(texts, front.max_inputs(), "inputs")?;
        if req.truncate == Some(false)
            && let Some(long) = texts.iter().position(|t| front.too_long(t))
        {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "input {long} is longer than the model's {} tokens (truncate: false)",
                    front.max_tokens
                ),
            )
            .param("inputs"));
        }
        let n = texts.len();
        let (vectors, _) = front.vectors(texts, req.dimensions).await?;
        Ok((n, vectors))
    }
    .await;
    match result {
        Ok((n, vectors)) => {
            record("/embed", started, n);
            json_response(StatusCode::OK, &vectors)
        }
        Err(e) => {
            record("/embed", started, 0);
            e.into_response()
        }
    }
}

/// `GET /v1/models`: the served model, in OpenAI's list.
async fn models(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    if let Err(e) = front.authorize(&headers) {
        return e.into_response();
    }
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{"id": front.model, "object": "model", "created": 0, "owned_by": "keel"}],
        }),
    )
}

/// `GET /health`: 200 once warm, 503 while warming up or draining (no credentials).
async fn health(State(front): State<Arc<Front>>) -> Response {
    let state = &front.state;
    let status = if state.is_closing() {
        Some("shutting down".to_string())
    } else {
        state.pipeline.embedder().warming()
    };
    match status {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => {
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// `GET /info`: what is served.
async fn info(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    if let Err(e) = front.authorize(&headers) {
        return e.into_response();
    }
    let state = &front.state;
    let settings = &state.settings;
    json_response(
        StatusCode::OK,
        &json!({
            "model": front.model,
            "model_id": state.pipeline.embedder().model_id(),
            "dimensions": state.pipeline.dim(),
            "max_input_tokens": front.max_tokens,
            "precision": settings.embedder.cpu.precision,
            "backend": settings.embedder.backend,
            "device": state.pipeline.embedder().stats().device,
            "version": env!("CARGO_PKG_VERSION"),
        }),
    )
}
