-- Raw vehicle telemetry from the built-in generator (no external servers needed).
-- seed makes it deterministic: every pipeline reading this stream sees the same events.
CREATE STREAM vehicle_events (
    vehicle_id  BIGINT NOT NULL,
    ts          TIMESTAMP(3) NOT NULL,
    speed_kmh   DOUBLE,
    engine_temp DOUBLE,
    fuel_level  DOUBLE,
    lat         DOUBLE,
    lon         DOUBLE,
    status      TEXT,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (
    connector = 'datagen',
    rows_per_second = 1000,
    cardinality = 500,
    seed = 42
);
