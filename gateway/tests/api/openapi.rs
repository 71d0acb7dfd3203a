//! The API contract, `docs/openapi.yaml`, kept true: the admin listener serves it, and its
//! operations are exactly those of the routers' tables (the items API's
//! `app_core::api::ENDPOINTS`, the admin listener's `gateway::admin::ENDPOINTS`), both ways.
//! A route added to a table and not to the document fails here, and so does an operation
//! documented that no table answers. (What the operations answer is schemathesis' part:
//! `scripts/api-fuzz`, a step of `scripts/test`.)

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::{Backends, TestApp};

const DOCUMENT: &str = include_str!("../../../docs/openapi.yaml");

/// An operation: `METHOD /path/{parameter}`.
type Operation = (String, String);

/// The operations of `document` whose tags say they are served by the admin listener
/// (`true`) or by the public one (`false`).
fn documented(document: &Value, admin: bool) -> BTreeSet<Operation> {
    let mut out = BTreeSet::new();
    let paths = document["paths"].as_object().expect("paths");
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("a path item") {
            if method == "parameters" {
                continue;
            }
            let tags = operation["tags"]
                .as_array()
                .expect("every operation has tags");
            let on_admin = tags.iter().any(|tag| tag == "admin");
            if on_admin == admin {
                out.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

fn routed<'a>(
    endpoints: impl Iterator<Item = (&'a str, Vec<&'a http::Method>)>,
) -> BTreeSet<Operation> {
    endpoints
        .flat_map(|(path, methods)| {
            methods
                .into_iter()
                .map(move |method| (method.as_str().to_owned(), path.to_owned()))
        })
        .collect()
}

fn assert_same(listener: &str, documented: &BTreeSet<Operation>, routed: &BTreeSet<Operation>) {
    let undocumented: Vec<_> = routed.difference(documented).collect();
    let unrouted: Vec<_> = documented.difference(routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "{listener} listener: routed but not in docs/openapi.yaml: {undocumented:?}; \
         in docs/openapi.yaml but not routed: {unrouted:?}"
    );
}

/// Mutation: drop `/openapi.yaml` from the admin table, or `DELETE /items/{id}` from the
/// document, and this fails naming it.
#[tokio::test]
async fn the_served_document_has_exactly_the_routers_operations() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let admin = |path: &str| format!("http://{}{path}", app.admin);

    let rsp = app.client.get(admin("/openapi.yaml")).send().await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["content-type"], "application/yaml");
    assert_eq!(rsp.text().await.unwrap(), DOCUMENT);

    let rsp = app.client.get(admin("/openapi.json")).send().await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["content-type"], "application/json");
    let document: Value = rsp.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));

    let items = routed(
        app_core::api::ENDPOINTS
            .iter()
            .map(|e| (e.path, e.methods().collect())),
    );
    assert_same("public", &documented(&document, false), &items);
    let admin_api = routed(
        gateway::admin::ENDPOINTS
            .iter()
            .map(|e| (e.path, e.methods().collect())),
    );
    assert_same("admin", &documented(&document, true), &admin_api);

    // `/` lists the same table.
    let rsp = app.client.get(admin("/")).send().await.unwrap();
    let listed: Value = rsp.json().await.unwrap();
    let paths: Vec<&str> = gateway::admin::ENDPOINTS.iter().map(|e| e.path).collect();
    assert_eq!(listed["endpoints"], serde_json::json!(paths));
    app.stop().await;
}

/// Mutation: route admin requests by path alone again (`/` answered a POST with 404),
/// and this fails.
#[tokio::test]
async fn a_known_admin_path_with_another_method_answers_405_with_allow() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    for (method, path, allow) in [
        (reqwest::Method::POST, "/", "GET, HEAD"),
        (reqwest::Method::DELETE, "/openapi.json", "GET, HEAD"),
        (
            reqwest::Method::GET,
            "/admin/routes/web/split",
            "PUT, DELETE",
        ),
    ] {
        let rsp = app
            .client
            .request(method.clone(), format!("http://{}{path}", app.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 405, "{method} {path}");
        assert_eq!(rsp.headers()["allow"], allow, "{method} {path}");
    }
    app.stop().await;
}
