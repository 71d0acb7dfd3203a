//! Bad input gets a JSON error with the right status, and loses nothing.

use crate::helpers::{Backends, TestApp, assert_error, json_body};

#[tokio::test]
async fn bad_bodies_are_refused_with_the_reason() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let long = "x".repeat(201);
    let cases: &[(&str, &str)] = &[
        (r#"{"name": "#, "invalid_json"),
        ("not json", "invalid_json"),
        ("{}", "invalid_body"),
        (r#"{"name": ""}"#, "invalid_body"),
        (r#"{"name": "   "}"#, "invalid_body"),
        (r#"{"name": 42}"#, "invalid_body"),
        (r#"{"name": "ok", "colour": "red"}"#, "invalid_body"),
        (&format!(r#"{{"name": "{long}"}}"#), "invalid_body"),
    ];
    for (body, code) in cases {
        let rsp = app.post_json("/items", body).await;
        assert_error(rsp, 400, code).await;
    }
    // 200 characters is still fine, even when they take more bytes.
    assert_eq!(
        app.post_json("/items", &format!(r#"{{"name": "{}"}}"#, "é".repeat(200)))
            .await
            .status(),
        201
    );
    assert_eq!(
        json_body(app.get("/items").await).await["count"],
        1,
        "nothing else was stored"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_missing_or_wrong_content_type_is_415() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let rsp = app
        .client
        .post(app.url("/items"))
        .body(r#"{"name":"a"}"#)
        .send()
        .await
        .unwrap();
    assert_error(rsp, 415, "unsupported_media_type").await;
    let rsp = app
        .client
        .post(app.url("/items"))
        .header("content-type", "text/plain")
        .body(r#"{"name":"a"}"#)
        .send()
        .await;
    assert_error(rsp.unwrap(), 415, "unsupported_media_type").await;
    let rsp = app
        .client
        .post(app.url("/items"))
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"name":"a"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 201, "parameters on the media type are fine");
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_64_kib_is_413_declared_or_streamed() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(70 * 1024));

    let rsp = app.post_json("/items", &big).await;
    assert_error(rsp, 413, "payload_too_large").await;

    // Without Content-Length (chunked): refused once the limit is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(8192)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let stream = futures_util::stream::iter(chunks);
    let rsp = app
        .client
        .post(app.url("/items"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_error(rsp, 413, "payload_too_large").await;
    assert_eq!(json_body(app.get("/items").await).await["count"], 0);
    app.stop().await;
}

#[tokio::test]
async fn bad_ids_are_400() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    for id in [
        "abc",
        "0",
        "-5",
        "1.5",
        "9223372036854775808",
        "99999999999999999999999",
    ] {
        assert_error(app.get(&format!("/items/{id}")).await, 400, "bad_request").await;
    }
    assert_error(app.get("/items?limit=0").await, 400, "bad_request").await;
    assert_error(app.get("/items?limit=501").await, 400, "bad_request").await;
    assert_error(app.get("/items?after=x").await, 400, "bad_request").await;
    app.stop().await;
}

#[tokio::test]
async fn unsupported_methods_are_405_with_allow() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let rsp = app.client.patch(app.url("/items/1")).send().await.unwrap();
    assert_eq!(rsp.headers()["allow"], "GET, PUT, DELETE");
    assert_error(rsp, 405, "method_not_allowed").await;
    let rsp = app.client.delete(app.url("/items")).send().await.unwrap();
    assert_eq!(rsp.headers()["allow"], "GET, POST");
    assert_error(rsp, 405, "method_not_allowed").await;
    app.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_404_json() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    for path in ["/", "/nope", "/items/1/extra", "/itemsx", "/items/"] {
        assert_error(app.get(path).await, 404, "not_found").await;
    }
    app.stop().await;
}
