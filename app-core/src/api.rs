//! HTTP handlers for `/items*` and `/health`, on plain `http` types.
//!
//! This module knows requests and responses but no sockets, TLS or hyper connection
//! machinery, so the gateway hosts it in process and tests call it without a network.
//! Every outcome is a response: errors are JSON `{"error", "message"}` with the right
//! status, never a panic and never an internal cause in the body.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};

use crate::App;
use crate::cache::{Kind, etag};
use crate::model::{ItemId, ItemInput};
use crate::service::{Lookup, ServiceError, Updated};
use crate::store::StoreError;

/// The body type of every response the app makes.
pub type ApiBody = Full<Bytes>;

/// Which tier answered: `l1`, `l2` or `miss`.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const MAX_LIMIT: u16 = 500;
const DEFAULT_LIMIT: u16 = 50;

/// The routes of the items API, decided once from method and path.
#[derive(Debug, PartialEq, Eq)]
enum ApiRoute {
    List,
    Create,
    Get(ItemId),
    Update(ItemId),
    Delete(ItemId),
    Health,
}

/// What a method on an endpoint leads to, given the path's `{…}` segment (empty when the
/// path has none). Opaque outside the crate: others read only the table's paths and methods.
#[derive(Debug)]
pub struct ToRoute(fn(&str) -> Result<ApiRoute, ApiError>);

/// A path of an endpoint table and what each method on it leads to: the items API's
/// routes here, the admin listener's operations in the gateway.
#[derive(Debug)]
pub struct Endpoint<T: 'static> {
    /// The path as `docs/openapi.yaml` writes it; `{…}` stands for one path segment.
    pub path: &'static str,
    /// The `Allow` header of a 405: the methods of `routes`, in order (a test checks).
    pub allow: &'static str,
    /// Each method the path answers and what it leads to.
    pub routes: &'static [(Method, T)],
}

impl<T> Endpoint<T> {
    /// The methods this path answers.
    pub fn methods(&self) -> impl Iterator<Item = &Method> {
        self.routes.iter().map(|(method, _)| method)
    }
}

/// Why an endpoint table has no route for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    /// No endpoint has this path: a 404.
    NoPath,
    /// The path's endpoint does not answer this method: a 405 with this `Allow`.
    Method {
        /// The endpoint's `Allow` header.
        allow: &'static str,
    },
}

/// What `method` on `path` leads to in `table`, with the path's `{…}` segment (empty when
/// the endpoint's path has none). The first endpoint whose path matches decides.
///
/// # Errors
/// No endpoint has this path, or it does not answer this method.
pub fn route<'t, 'p, T>(
    table: &'t [Endpoint<T>],
    method: &Method,
    path: &'p str,
) -> Result<(&'t T, &'p str), Unrouted> {
    let (endpoint, parameter) = table
        .iter()
        .find_map(|endpoint| Some((endpoint, match_path(endpoint.path, path)?)))
        .ok_or(Unrouted::NoPath)?;
    match endpoint.routes.iter().find(|(m, _)| m == method) {
        Some((_, to)) => Ok((to, parameter)),
        None => Err(Unrouted::Method {
            allow: endpoint.allow,
        }),
    }
}

/// Whether `path` matches `template`, segment by segment, where a `{…}` segment of the
/// template matches any non-empty one: `Some` of that segment (empty when the template
/// has none), else `None`.
///
/// One walk over the bytes of both: it runs for every request, and splitting both on `/`
/// cost several hundred instructions of an L1 hit. Templates are ASCII, so a path byte
/// that equals a template byte ends a character and slicing the path there is sound.
fn match_path<'p>(template: &str, path: &'p str) -> Option<&'p str> {
    let (t, p) = (template.as_bytes(), path.as_bytes());
    let segment_end = |bytes: &[u8], from: usize| {
        bytes
            .get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == b'/'))
            .map_or(bytes.len(), |n| from + n)
    };
    let (mut i, mut j) = (0, 0);
    let mut parameter = "";
    while let Some(&expected) = t.get(i) {
        if expected == b'{' {
            let end = segment_end(p, j);
            if end == j {
                return None;
            }
            parameter = path.get(j..end)?;
            (i, j) = (segment_end(t, i), end);
        } else if p.get(j) == Some(&expected) {
            (i, j) = (i + 1, j + 1);
        } else {
            return None;
        }
    }
    (j == p.len()).then_some(parameter)
}

/// The items API: the one table its router reads, and the one the contract
/// test compares with `docs/openapi.yaml`. The hot path, one item, comes first. HEAD is
/// a GET whose body the listener drops (RFC 9110 §9.3.2).
pub static ENDPOINTS: [Endpoint<ToRoute>; 3] = [
    Endpoint {
        path: "/items/{id}",
        allow: "GET, HEAD, PUT, DELETE",
        routes: &[
            (Method::GET, ToRoute(|id| item(id, ApiRoute::Get))),
            (Method::HEAD, ToRoute(|id| item(id, ApiRoute::Get))),
            (Method::PUT, ToRoute(|id| item(id, ApiRoute::Update))),
            (Method::DELETE, ToRoute(|id| item(id, ApiRoute::Delete))),
        ],
    },
    Endpoint {
        path: "/items",
        allow: "GET, HEAD, POST",
        routes: &[
            (Method::GET, ToRoute(|_| Ok(ApiRoute::List))),
            (Method::HEAD, ToRoute(|_| Ok(ApiRoute::List))),
            (Method::POST, ToRoute(|_| Ok(ApiRoute::Create))),
        ],
    },
    Endpoint {
        path: "/health",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, ToRoute(|_| Ok(ApiRoute::Health))),
            (Method::HEAD, ToRoute(|_| Ok(ApiRoute::Health))),
        ],
    },
];

/// The route to item `id`, or a 400 naming what is wrong with it.
fn item(id: &str, route: fn(ItemId) -> ApiRoute) -> Result<ApiRoute, ApiError> {
    ItemId::parse(id).map(route).map_err(ApiError::bad_request)
}

impl ApiRoute {
    fn parse(method: &Method, path: &str) -> Result<Self, ApiError> {
        match route(&ENDPOINTS, method, path) {
            Ok((ToRoute(to_route), parameter)) => to_route(parameter),
            Err(Unrouted::NoPath) => Err(ApiError::not_found("no such route")),
            Err(Unrouted::Method { allow }) => Err(ApiError::method_not_allowed(allow)),
        }
    }
}

/// The app's answer to one request, under way: boxed, and owning what it needs (the
/// gateway's future around it stays small however big the work, and outlives no
/// borrow of the app).
pub type Answer = Pin<Box<dyn Future<Output = Response<ApiBody>> + Send>>;

/// Starts answering one request for the app.
///
/// The route is decided here, before the first poll. A read takes from the request only
/// its id and `If-None-Match`, and drops the rest at once: hyper reads ahead on the
/// connection while the answer is pending, and a request still holding slices of its
/// read buffer would make it allocate a new one for every request.
pub(crate) fn handle<B>(app: &App, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let route = match ApiRoute::parse(req.method(), req.uri().path()) {
        Ok(route) => route,
        Err(e) => return answered(e),
    };
    if route != ApiRoute::Health && !app.serves_items() {
        return answered(ApiError::unavailable(
            "the service is starting: the database is not ready yet",
        ));
    }
    let app = app.clone();
    match route {
        ApiRoute::Get(id) => {
            // A copy: a clone would hold the read buffer (see above) until the answer.
            let if_none_match = req
                .headers()
                .get(header::IF_NONE_MATCH)
                .map(|v| Bytes::copy_from_slice(v.as_bytes()));
            drop(req);
            Box::pin(async move { answer(get(&app, id, if_none_match).await) })
        }
        ApiRoute::List => match page_params(req.uri().query().unwrap_or("")) {
            Ok((after, limit)) => Box::pin(async move { answer(list(&app, after, limit).await) }),
            Err(e) => answered(e),
        },
        ApiRoute::Create => Box::pin(async move { answer(create(&app, req).await) }),
        ApiRoute::Update(id) => Box::pin(async move { answer(update(&app, id, req).await) }),
        ApiRoute::Delete(id) => Box::pin(async move { answer(delete(&app, id).await) }),
        ApiRoute::Health => Box::pin(async move { health(&app).await }),
    }
}

fn answer(result: Result<Response<ApiBody>, ApiError>) -> Response<ApiBody> {
    result.unwrap_or_else(ApiError::into_response)
}

fn answered(error: ApiError) -> Answer {
    Box::pin(std::future::ready(error.into_response()))
}

/// `GET /items/{id}`: the hot path.
async fn get(
    app: &App,
    id: ItemId,
    if_none_match: Option<Bytes>,
) -> Result<Response<ApiBody>, ApiError> {
    let Lookup { entry, tier } = app
        .items()
        .get(id)
        .await
        .map_err(|e| ApiError::from_service(&e))?;
    if entry.kind == Kind::Absent {
        let mut rsp = ApiError::not_found(format!("item {id} does not exist")).into_response();
        rsp.headers_mut()
            .insert(&X_CACHE, HeaderValue::from_static(tier.header()));
        return Ok(rsp);
    }
    let not_modified =
        if_none_match.is_some_and(|v| self::if_none_match(&v, entry.etag().as_bytes()));
    let (status, body) = if not_modified {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else {
        (StatusCode::OK, entry.body(tier))
    };
    let mut rsp = json_response(status, body);
    let headers = rsp.headers_mut();
    headers.insert(header::ETAG, entry.etag().clone());
    headers.insert(&X_CACHE, HeaderValue::from_static(tier.header()));
    Ok(rsp)
}

/// `GET /items?after=&limit=`.
async fn list(app: &App, after: i64, limit: u16) -> Result<Response<ApiBody>, ApiError> {
    let page = app
        .items()
        .list(after, limit)
        .await
        .map_err(|e| ApiError::from_service(&e))?;
    let mut rsp = json_response(StatusCode::OK, page.body);
    rsp.headers_mut()
        .insert(&X_CACHE, HeaderValue::from_static(page.tier.header()));
    Ok(rsp)
}

/// `POST /items`.
async fn create<B>(app: &App, req: Request<B>) -> Result<Response<ApiBody>, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let name = read_input(req, app.max_body_bytes()).await?;
    let (id, entry) = app
        .items()
        .create(&name)
        .await
        .map_err(|e| ApiError::from_service(&e))?;
    let location = format!("/items/{id}");
    let mut rsp = json_response(StatusCode::CREATED, written_body(&entry.item_json()));
    let headers = rsp.headers_mut();
    headers.insert(header::ETAG, entry.etag().clone());
    if let Ok(location) = HeaderValue::try_from(location) {
        headers.insert(header::LOCATION, location);
    }
    Ok(rsp)
}

/// `PUT /items/{id}`, with an optional `If-Match`.
async fn update<B>(app: &App, id: ItemId, req: Request<B>) -> Result<Response<ApiBody>, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let expected = req
        .headers()
        .get(header::IF_MATCH)
        .map(|v| if_match_versions(v.as_bytes()));
    let name = read_input(req, app.max_body_bytes()).await?;
    let outcome = app
        .items()
        .update(id, &name, expected.as_ref().and_then(|e| e.as_deref()))
        .await
        .map_err(|e| ApiError::from_service(&e))?;
    match outcome {
        Updated::Done(entry) => {
            let mut rsp = json_response(StatusCode::OK, written_body(&entry.item_json()));
            rsp.headers_mut().insert(header::ETAG, entry.etag().clone());
            Ok(rsp)
        }
        // `If-Match: *` asks for any current version; with none, it fails (RFC 9110 13.1.1).
        Updated::NotFound if matches!(expected, Some(None)) => Err(ApiError::precondition_failed(
            format!("item {id} does not exist"),
        )),
        Updated::NotFound => Err(ApiError::not_found(format!("item {id} does not exist"))),
        Updated::Conflict(version) => {
            let mut rsp = ApiError::precondition_failed(format!(
                "If-Match does not name the current version of item {id}, which is {version}"
            ))
            .into_response();
            rsp.headers_mut().insert(header::ETAG, etag(version));
            Ok(rsp)
        }
    }
}

/// `DELETE /items/{id}`.
async fn delete(app: &App, id: ItemId) -> Result<Response<ApiBody>, ApiError> {
    match app
        .items()
        .delete(id)
        .await
        .map_err(|e| ApiError::from_service(&e))?
    {
        true => Ok(json_response(StatusCode::NO_CONTENT, Bytes::new())),
        false => Err(ApiError::not_found(format!("item {id} does not exist"))),
    }
}

async fn health(app: &App) -> Response<ApiBody> {
    let report = app.health().await;
    let status = match report.status {
        crate::health::Status::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    match serde_json::to_vec(&report) {
        Ok(body) => {
            let mut rsp = json_response(status, Bytes::from(body));
            rsp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            rsp
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// `limit` (1..=500, default 50) and `after` (an id, default 0) from the query string.
fn page_params(query: &str) -> Result<(i64, u16), ApiError> {
    let (mut after, mut limit) = (0, DEFAULT_LIMIT);
    for (key, value) in query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
    {
        match key {
            "limit" => {
                limit = value
                    .parse::<u16>()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit must be an integer from 1 to {MAX_LIMIT}"
                        ))
                    })?;
            }
            "after" => {
                after = value
                    .parse::<i64>()
                    .ok()
                    .filter(|a| *a >= 0)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "after must be a non-negative integer (the last id seen)",
                        )
                    })?;
            }
            _ => {}
        }
    }
    Ok((after, limit))
}

/// Reads and validates a JSON `{"name"}` body without holding more than `max` bytes:
/// a declared length over the limit is refused before reading, and a streamed body
/// stops at the limit.
async fn read_input<B>(req: Request<B>, max: usize) -> Result<String, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    check_json_content_type(req.headers())?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(ApiError::payload_too_large(max));
    }
    let bytes = match Limited::new(req.into_body(), max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::payload_too_large(max));
        }
        Err(_) => return Err(ApiError::bad_request("could not read the request body")),
    };
    let input: ItemInput = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string())
        }
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("malformed JSON: {e}"),
        ),
    })?;
    input
        .into_name()
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", m))
}

fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media_type(
            "Content-Type is missing; send application/json",
        ));
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(
            "Content-Type must be application/json",
        ))
    }
}

/// Whether `If-None-Match` names `etag`, by weak comparison (RFC 9110 13.1.2).
fn if_none_match(header: &[u8], etag: &[u8]) -> bool {
    header
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .any(|tag| tag == b"*" || tag.strip_prefix(b"W/").unwrap_or(tag) == etag)
}

/// The versions an `If-Match` header names; `None` for `*` (any version). Weak and
/// malformed tags name nothing: `If-Match` uses strong comparison.
fn if_match_versions(header: &[u8]) -> Option<Vec<i64>> {
    let tags: Vec<&[u8]> = header
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .collect();
    if tags.contains(&&b"*"[..]) {
        return None;
    }
    Some(
        tags.into_iter()
            .filter_map(|t| t.strip_prefix(b"\"")?.strip_suffix(b"\""))
            .filter_map(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .collect(),
    )
}

fn written_body(item_json: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(item_json.len() + 9);
    body.extend_from_slice(br#"{"item":"#);
    body.extend_from_slice(item_json);
    body.push(b'}');
    Bytes::from(body)
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ApiBody> {
    let mut rsp = Response::new(Full::new(body));
    *rsp.status_mut() = status;
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        rsp.headers_mut().insert(header::CONTENT_TYPE, JSON);
    }
    rsp
}

/// An error answer: status, a stable machine-readable code, and a message for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("allowed methods: {allow}"),
        );
        e.allow = Some(allow);
        e
    }

    fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            message,
        )
    }

    fn payload_too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body must be at most {max} bytes"),
        )
    }

    fn unsupported_media_type(message: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    fn unavailable(message: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    fn internal(error: impl StdError) -> Self {
        tracing::error!(error = %crate::ErrorChain(&error), "Request failed.");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    fn from_service(error: &ServiceError) -> Self {
        match error {
            ServiceError::Store(StoreError::Unavailable(_)) => {
                tracing::warn!(error = %crate::ErrorChain(error), "Database unavailable.");
                Self::unavailable("the database is unavailable; retry shortly")
            }
            _ => Self::internal(error),
        }
    }

    fn into_response(self) -> Response<ApiBody> {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut rsp = json_response(self.status, Bytes::from(body.to_string()));
        let headers = rsp.headers_mut();
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_decided_by_method_and_path() {
        let id = |n| ItemId::from(n);
        assert_eq!(
            ApiRoute::parse(&Method::GET, "/items").unwrap(),
            ApiRoute::List
        );
        assert_eq!(
            ApiRoute::parse(&Method::POST, "/items").unwrap(),
            ApiRoute::Create
        );
        assert_eq!(
            ApiRoute::parse(&Method::GET, "/items/7").unwrap(),
            ApiRoute::Get(id(7))
        );
        assert_eq!(
            ApiRoute::parse(&Method::PUT, "/items/7").unwrap(),
            ApiRoute::Update(id(7))
        );
        assert_eq!(
            ApiRoute::parse(&Method::DELETE, "/items/7").unwrap(),
            ApiRoute::Delete(id(7))
        );
        assert_eq!(
            ApiRoute::parse(&Method::GET, "/health").unwrap(),
            ApiRoute::Health
        );
        assert_eq!(
            ApiRoute::parse(&Method::HEAD, "/items/7").unwrap(),
            ApiRoute::Get(id(7))
        );
        assert_eq!(
            ApiRoute::parse(&Method::HEAD, "/items").unwrap(),
            ApiRoute::List
        );
    }

    #[test]
    fn wrong_routes_get_404_405_or_400() {
        let status = |m: Method, p: &str| ApiRoute::parse(&m, p).unwrap_err().status;
        assert_eq!(status(Method::GET, "/items/"), StatusCode::NOT_FOUND);
        assert_eq!(status(Method::GET, "/items/1/x"), StatusCode::NOT_FOUND);
        assert_eq!(status(Method::GET, "/nope"), StatusCode::NOT_FOUND);
        assert_eq!(
            status(Method::PATCH, "/items/1"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(Method::DELETE, "/items"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(status(Method::GET, "/items/abc"), StatusCode::BAD_REQUEST);
        assert_eq!(status(Method::GET, "/items/0"), StatusCode::BAD_REQUEST);
    }

    /// Mutation: add a method to a route list without its `Allow`, and this fails.
    #[test]
    fn every_allow_lists_its_endpoints_methods() {
        for endpoint in &ENDPOINTS {
            let methods: Vec<&str> = endpoint.methods().map(Method::as_str).collect();
            assert_eq!(endpoint.allow, methods.join(", "), "{}", endpoint.path);
        }
    }

    #[test]
    fn paths_match_templates_segment_by_segment() {
        assert_eq!(match_path("/items", "/items"), Some(""));
        assert_eq!(match_path("/items/{id}", "/items/7"), Some("7"));
        assert_eq!(match_path("/a/{name}/b", "/a/web/b"), Some("web"));
        assert_eq!(match_path("/", "/"), Some(""));
        assert_eq!(match_path("/items/{id}", "/items/é"), Some("é"));
        for (template, path) in [
            ("/items/{id}", "/items/"),
            ("/items/{id}", "/items/7/x"),
            ("/items/{id}", "/items"),
            ("/items", "/items/"),
            ("/a/{name}/b", "/a//b"),
            ("/", "/x"),
            ("/items", "/item"),
            ("/items", "/itemsx"),
            ("/items/{id}", "/items7"),
        ] {
            assert_eq!(match_path(template, path), None, "{template} {path}");
        }
    }

    #[test]
    fn page_params_are_bounded() {
        assert_eq!(page_params("").unwrap(), (0, 50));
        assert_eq!(page_params("limit=500&after=9").unwrap(), (9, 500));
        for bad in [
            "limit=0",
            "limit=501",
            "limit=x",
            "after=-1",
            "after=",
            "limit=",
        ] {
            assert!(page_params(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn conditional_headers_compare_etags() {
        assert!(if_none_match(br#""3""#, br#""3""#));
        assert!(if_none_match(br#""1", W/"3""#, br#""3""#));
        assert!(if_none_match(b"*", br#""3""#));
        assert!(!if_none_match(br#""4""#, br#""3""#));
        assert_eq!(if_match_versions(br#""3", "5""#), Some(vec![3, 5]));
        assert_eq!(if_match_versions(br#"W/"3""#), Some(vec![]));
        assert_eq!(if_match_versions(b"*"), None);
    }
}
