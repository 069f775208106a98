//! Exports that cannot hurt the service: CSV readers that read nothing hold no database
//! connection and no snapshot, are cut after the write timeout, and a conversion submitted
//! meanwhile is accepted and completes.

use std::time::Duration;

use bulkops_tests::fixture::{World, insert, rows};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(120);
/// Individuals to export: more than socket buffers and the server's queue hold, so an
/// export whose client reads nothing cannot finish by itself.
const INDIVIDUALS: i64 = 200_000;

/// Opens `POST /v1/individuals/search.csv` with a tiny receive window and reads nothing
/// but the first byte's arrival (peeked, not consumed).
async fn idle_export(base: &str, token: &str) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().expect("address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(addr).await.expect("connect");
    let body = r#"{"filter": {}}"#;
    let request = format!(
        "POST /v1/individuals/search.csv HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut first = [0_u8; 1];
    tokio::time::timeout(WAIT, stream.peek(&mut first))
        .await
        .expect("the answer begins")
        .expect("peek");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_idle_csv_readers_starve_nothing() {
    let env = crate::env("exports_idle").await;
    let db = &env.db;
    let w = World::new(db, "Export Agency").await;
    rows(
        db,
        "WITH ins AS (INSERT INTO individuals (agency_id, first_name, last_name, status)
                      SELECT $1, 'F' || g, 'L' || g, 'Active' FROM generate_series(1, $2::bigint) g RETURNING 1)
         SELECT to_jsonb(count(*)) AS j FROM ins",
        vec![w.agency.into(), INDIVIDUALS.into()],
    )
    .await;
    let sr = insert(
        db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": w.record_type, "first_name": "Lead"}),
    )
    .await;
    env.set("BULKOPS__HTTP__WRITE_TIMEOUT_MS", 3000).await;
    let api = env.start(1).await.expect("start");
    let t = w.token();

    let mut readers = Vec::new();
    for _ in 0..10 {
        readers.push(idle_export(&api.base, &t).await);
    }
    // A single conversion, as a user watching a modal submits it: accepted and done.
    let batch = api.convert(&t, &[sr]).await.expect("conversion accepted");
    let done = api
        .wait_completed(&t, batch, WAIT)
        .await
        .expect("conversion completes");
    assert_eq!(done["counts"]["converted"], 1, "{done}");

    // The readers that got a stream were cut after the write timeout (the chunked body
    // never ends); the others were refused at once with a 503 (the export budget).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (mut streamed, mut refused) = (0, 0);
    for mut r in readers {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, r.read_to_end(&mut got))
            .await
            .expect("the connection ends");
        let head = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
        if head.starts_with("HTTP/1.1 503") {
            refused += 1;
            continue;
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !got.ends_with(b"0\r\n\r\n"),
            "an idle reader is cut, not served a whole export ({} bytes)",
            got.len()
        );
        streamed += 1;
    }
    assert!(streamed >= 1, "some exports streamed ({refused} refused)");
    env.finish().await;
}
