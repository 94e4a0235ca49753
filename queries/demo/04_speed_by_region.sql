-- Reference data: one row per vehicle, from a CSV file held in memory as a lookup table.
-- The file is reloaded when it changes (replace it by writing a new file and renaming it
-- over this one); a batch of events is always joined against one whole version.
-- The path is relative to the directory weir runs in (the repository root in the README).
CREATE TABLE vehicles (
    vehicle_id BIGINT PRIMARY KEY,
    make       TEXT,
    model      TEXT,
    region     TEXT
) WITH (
    connector = 'file',
    path = 'queries/demo/vehicles.csv',
    'reload.interval' = '60s'
);

-- The job Weir is for: enrich each event with its vehicle's dimensions, then cut cardinality
-- and frequency to one row per region and make per minute.
-- Query it from psql: SELECT * FROM speed_by_region_1m ORDER BY window_start DESC LIMIT 10;
CREATE MATERIALIZED VIEW speed_by_region_1m AS
SELECT window_start, window_end, v.region, v.make,
       count(*) AS events, avg(e.speed_kmh) AS avg_speed, max(e.engine_temp) AS max_temp
FROM TUMBLE(vehicle_events, ts, INTERVAL '1' MINUTE) AS e
JOIN vehicles v ON e.vehicle_id = v.vehicle_id
GROUP BY window_start, window_end, v.region, v.make;

-- ...and into the lake, exactly once, one file a minute per hour partition
-- (dt=YYYY-MM-DD/hour=HH from window_end). Read it with DuckDB:
--   SELECT * FROM read_parquet('weir-data/lake/speed_by_region_1m/**/*.parquet', hive_partitioning = true);
CREATE SINK speed_by_region_lake FROM speed_by_region_1m WITH (
    connector = 'parquet',
    path = 'file://weir-data/lake/speed_by_region_1m',
    partition_by = 'date',
    'rollover.interval' = '1m'
);
