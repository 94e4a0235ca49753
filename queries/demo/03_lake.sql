-- The local Parquet lake: the view's results, and the raw events as an archive.
-- Paths are relative to the directory weir runs in; read them with DuckDB:
--   SELECT count(*) FROM 'weir-data/lake/speeding/*.parquet';
CREATE SINK speeding_lake FROM speeding WITH (
    connector = 'parquet',
    path = 'file://weir-data/lake/speeding',
    'rollover.interval' = '5s'
);

CREATE SINK vehicle_events_lake WITH (
    connector = 'parquet',
    path = 'file://weir-data/lake/vehicle_events',
    'rollover.interval' = '5s'
) AS SELECT * FROM vehicle_events;
