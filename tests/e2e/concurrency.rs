//! The engine without a global lock across I/O: a statement that waits on the world (a
//! broker that does not answer) stalls no other session, and statements sent together by
//! different sessions start their pipelines independently.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::harness::Weir;

const STREAM: &str = "CREATE STREAM vehicle_events (vehicle_id BIGINT, ts TIMESTAMP(3), \
    speed_kmh DOUBLE, status TEXT) \
    WITH (connector = 'datagen', rows_per_second = 2000, cardinality = 50, seed = 1)";
const VIEW: &str = "CREATE MATERIALIZED VIEW fast AS SELECT vehicle_id, speed_kmh \
    FROM vehicle_events WHERE speed_kmh > 100";

/// A "broker" that accepts connections and never answers: librdkafka waits on it until
/// `connect.timeout`. Counts the connections it took.
fn silent_broker() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (port, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_ddl_go_on_while_a_create_stream_waits_on_a_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start(dir.path(), None);
    let client = weir.client().await;
    client
        .batch_execute(&format!("{STREAM}; {VIEW}"))
        .await
        .unwrap_or_else(|e| panic!("setup: {e:?}\n{}", weir.log_text()));

    let (port, accepted) = silent_broker();
    let waiting = {
        let client = weir.client().await;
        tokio::spawn(async move {
            client
                .batch_execute(&format!(
                    "CREATE STREAM remote (k BIGINT) WITH (connector = 'kafka', topic = 't', \
                     'bootstrap.servers' = '127.0.0.1:{port}', 'connect.timeout' = '20s')"
                ))
                .await
        })
    };
    // The CREATE is in its slow part once the broker has been dialled.
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(!waiting.is_finished(), "the CREATE waits on the broker");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // 20 other sessions query the view, list the pipelines, and one creates a view: none
    // waits for the CREATE STREAM.
    let mut sessions = Vec::new();
    for i in 0..20 {
        let client = weir.client().await;
        sessions.push(tokio::spawn(async move {
            let n: i64 = client
                .query_one("SELECT count(*) FROM fast WHERE speed_kmh > 100", &[])
                .await
                .expect("select")
                .get(0);
            assert!(n >= 0);
            client.simple_query("SHOW QUERIES").await.expect("show");
            if i == 0 {
                client
                    .batch_execute(
                        "CREATE MATERIALIZED VIEW slow AS SELECT vehicle_id FROM vehicle_events \
                         WHERE speed_kmh < 10",
                    )
                    .await
                    .expect("a CREATE on another name goes on");
            }
        }));
    }
    for session in sessions {
        session.await.expect("session");
    }
    assert!(
        !waiting.is_finished(),
        "every other session finished while the CREATE STREAM still waited on the broker"
    );

    // The name is taken meanwhile: a second CREATE of it is refused at once.
    let err = client
        .batch_execute("CREATE STREAM remote (k BIGINT) WITH (connector = 'datagen')")
        .await
        .expect_err("the name is being created");
    assert_eq!(err.code().map(|c| c.code()), Some("55006"), "{err:?}");

    let err = waiting
        .await
        .expect("task")
        .expect_err("the broker never answers");
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("08001"),
        "an unreachable broker is a connection failure: {err:?}"
    );
    // Refused, the name is free again.
    client
        .batch_execute("CREATE STREAM remote (k BIGINT) WITH (connector = 'datagen')")
        .await
        .expect("the name is free after the failed CREATE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_from_two_sessions_each_start_their_views_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = 20_000;
    let file: String = (0..rows)
        .map(|i| format!("{{\"k\":{},\"v\":{i}}}\n", i % 7))
        .collect();
    std::fs::write(dir.path().join("numbers.ndjson"), file).expect("write");
    let weir = Weir::start(dir.path(), None);
    // Two sessions at once, each a batch of a view over a stream and a view over that view:
    // each second view must see every row, so its sources may start only once its own
    // batch is wired, whatever the other session does meanwhile.
    let mut batches = Vec::new();
    for s in ["a", "b"] {
        let client = weir.client().await;
        batches.push(tokio::spawn(async move {
            client
                .batch_execute(&format!(
                    "CREATE STREAM numbers_{s} (k BIGINT, v BIGINT) \
                       WITH (connector = 'file', path = 'numbers.ndjson');
                     CREATE MATERIALIZED VIEW first_{s} AS \
                       SELECT k, v FROM numbers_{s};
                     CREATE MATERIALIZED VIEW second_{s} AS \
                       SELECT k, v FROM first_{s} WHERE v >= 0"
                ))
                .await
        }));
    }
    for batch in batches {
        batch
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("batch: {e:?}\n{}", weir.log_text()));
    }
    let client = weir.client().await;
    for s in ["a", "b"] {
        let counted = crate::harness::eventually(std::time::Duration::from_secs(60), || {
            let out = weir.psql(&["-At", "-c", &format!("SELECT count(*) FROM second_{s}")]);
            let n: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            (n == rows).then_some(n)
        });
        assert_eq!(
            counted,
            Some(rows),
            "second_{s} holds every row: {:?}\n{}",
            client
                .simple_query(&format!("SELECT count(*) FROM second_{s}"))
                .await
                .map(|m| format!("{m:?}")),
            weir.log_text()
        );
    }
}
