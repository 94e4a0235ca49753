//! The Prometheus remote-write sink against a real Prometheus (2.42, remote-write receiver
//! on): a windowed view's rows written, read back with `/api/v1/query`, compared series by
//! series, sample by sample; and an outage of the server mid-run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::{Prometheus, Weir, eventually};

/// A sample: (metric name, vehicle label, status label, timestamp ms) → value.
type Samples = BTreeMap<(String, String, String, i64), f64>;

const VIEW_COLUMNS: [&str; 3] = ["n", "avg_speed", "max_speed"];

/// The stream, a 5-second windowed view over it, and the Prometheus sink from the view.
fn statements(stream_options: &str, prometheus: &Prometheus) -> String {
    format!(
        "CREATE STREAM v (vehicle_id BIGINT, ts TIMESTAMP(3), speed_kmh DOUBLE, status TEXT, \
           WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
         WITH (connector = 'datagen', cardinality = '40', seed = '7', {stream_options}); \
         CREATE MATERIALIZED VIEW per_5s AS \
           SELECT window_start, window_end, CAST(vehicle_id AS TEXT) AS vehicle, status, \
                  count(*) AS n, avg(speed_kmh) AS avg_speed, max(speed_kmh) AS max_speed \
           FROM TUMBLE(v, ts, INTERVAL '5' SECOND) GROUP BY window_start, window_end, vehicle_id, status; \
         CREATE SINK prom FROM per_5s WITH (connector = 'prometheus_remote_write', url = '{}', \
           metric_prefix = 'fleet', 'labels.env' = 'e2e', batch_send_deadline = '200ms', \
           max_samples_per_send = '500', max_backoff = '1s');",
        prometheus.write_url()
    )
}

/// The view's rows as the samples they should become.
async fn expected(weir: &Weir) -> Samples {
    let client = weir.client().await;
    let rows = client
        .query(
            "SELECT window_end, vehicle, status, n, avg_speed, max_speed FROM per_5s",
            &[],
        )
        .await
        .expect("select the view");
    let mut samples = Samples::new();
    for row in rows {
        let end: chrono::NaiveDateTime = row.get(0);
        let ms = end.and_utc().timestamp_millis();
        let (vehicle, status): (String, String) = (row.get(1), row.get(2));
        let values = [row.get::<_, i64>(3) as f64, row.get(4), row.get(5)];
        for (column, value) in VIEW_COLUMNS.iter().zip(values) {
            let key = (
                format!("fleet_{column}"),
                vehicle.clone(),
                status.clone(),
                ms,
            );
            samples.insert(key, value);
        }
    }
    samples
}

/// Every sample Prometheus holds for the sink's series (`env="e2e"`).
fn stored(prometheus: &Prometheus) -> Samples {
    let now = chrono::Utc::now().timestamp() as f64;
    let mut samples = Samples::new();
    for series in prometheus.query(r#"{env="e2e"}[2h]"#, now + 600.0) {
        let labels = &series["metric"];
        let label = |name: &str| labels[name].as_str().unwrap_or_default().to_string();
        let label_names: Vec<&String> = labels
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        assert_eq!(
            label_names,
            ["__name__", "env", "status", "vehicle"],
            "{labels}"
        );
        for point in series["values"].as_array().into_iter().flatten() {
            let ms = (point[0].as_f64().unwrap_or_default() * 1000.0).round() as i64;
            let value: f64 = point[1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            samples.insert(
                (label("__name__"), label("vehicle"), label("status"), ms),
                value,
            );
        }
    }
    samples
}

/// Keys present on one side only, or with different values (at most 5 of each).
fn differences(weir: &Samples, prometheus: &Samples) -> String {
    let missing: Vec<_> = weir
        .iter()
        .filter(|(k, _)| !prometheus.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = prometheus
        .iter()
        .filter(|(k, _)| !weir.contains_key(*k))
        .take(5)
        .collect();
    let unequal: Vec<_> = weir
        .iter()
        .filter_map(|(k, v)| prometheus.get(k).filter(|p| *p != v).map(|p| (k, v, p)))
        .take(5)
        .collect();
    format!(
        "missing from Prometheus: {missing:?}\nonly in Prometheus: {extra:?}\nunequal: {unequal:?}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_views_rows_are_the_samples_prometheus_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prometheus = Prometheus::start(dir.path());
    let weir = Weir::start(dir.path(), None);
    // 30 000 rows 1 ms apart from now, all windows closed when the input ends.
    let sql = statements("max_rows = '30000', rows_per_second = '0'", &prometheus);
    let (ok, out, err) = weir.psql_c(&sql);
    assert!(ok, "{out}{err}");
    let expected_rows = eventually(Duration::from_secs(60), || {
        let (_, out, _) = weir.psql_c("SELECT count(*) FROM per_5s");
        out.lines()
            .nth(1)?
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
    });
    assert!(expected_rows.is_some(), "{}", weir.log_text());
    // The input is bounded: once the view stops growing, every window is in it.
    let mut expected = expected(&weir).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = self::expected(&weir).await;
        if now.len() == expected.len() {
            break;
        }
        expected = now;
    }
    // 30 s of event time from an arbitrary start touch six or seven 5-second windows; the
    // inner ones hold every (vehicle, status) pair, the two at the edges may hold fewer.
    let windows: std::collections::BTreeSet<i64> = expected.keys().map(|k| k.3).collect();
    assert!((6..=7).contains(&windows.len()), "{windows:?}");
    assert!(
        expected.len() >= 3 * 40 * 3 * (windows.len() - 2),
        "3 columns x 40 vehicles x 3 statuses in each inner window: {}",
        expected.len()
    );
    let stored = eventually(Duration::from_secs(60), || {
        let stored = stored(&prometheus);
        (stored.len() >= expected.len()).then_some(stored)
    })
    .unwrap_or_else(|| stored(&prometheus));
    assert!(
        stored == expected,
        "{} samples in Prometheus, {} in the view\n{}\n{}",
        stored.len(),
        expected.len(),
        differences(&expected, &stored),
        weir.log_text()
    );
    let metrics = weir.http_get("/metrics");
    let line = format!(
        "weir_remote_write_samples_sent_total{{sink=\"prom\"}} {}",
        expected.len()
    );
    assert!(metrics.contains(&line), "{line} in\n{metrics}");
    assert!(
        metrics.contains("weir_remote_write_requests_total{sink=\"prom\",code=\"204\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_down_for_30_seconds_leaves_no_gap_and_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut prometheus = Prometheus::start(dir.path());
    let weir = Weir::start(dir.path(), None);
    // Paced: 2000 rows a second of event time = wall time, so windows close as time passes.
    let sql = statements("rows_per_second = '2000'", &prometheus);
    let (ok, out, err) = weir.psql_c(&sql);
    assert!(ok, "{out}{err}");
    let sent = |weir: &Weir| {
        let metrics = weir.http_get("/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("weir_remote_write_samples_sent_total{sink=\"prom\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(60), || (sent(&weir) > 0).then_some(())).is_some(),
        "{}",
        weir.log_text()
    );
    let rss_before = weir.rss_bytes();

    prometheus.stop();
    let outage = Instant::now();
    let mut rss_peak = rss_before;
    while outage.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_peak = rss_peak.max(weir.rss_bytes());
    }
    let metrics = weir.http_get("/metrics");
    assert!(
        metrics.contains("weir_remote_write_requests_total{sink=\"prom\",code=\"error\"}"),
        "the outage shows in the metrics:\n{metrics}"
    );
    prometheus.restart();
    // A few windows after the outage; then every window the view holds must reach Prometheus.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let expected = expected(&weir).await;
    let windows: std::collections::BTreeSet<i64> = expected.keys().map(|k| k.3).collect();
    assert!(
        windows.len() >= 9,
        "windows before, during and after: {windows:?}"
    );
    let stored = eventually(Duration::from_secs(60), || {
        let stored = stored(&prometheus);
        expected
            .keys()
            .all(|k| stored.contains_key(k))
            .then_some(stored)
    })
    .unwrap_or_else(|| stored(&prometheus));
    for (key, value) in &expected {
        assert_eq!(
            stored.get(key),
            Some(value),
            "{key:?}\n{}",
            differences(&expected, &stored)
        );
    }
    assert!(
        rss_peak < rss_before + (64 << 20),
        "RSS stayed bounded during the outage: {} MiB before, {} MiB at the peak",
        rss_before >> 20,
        rss_peak >> 20
    );
}
