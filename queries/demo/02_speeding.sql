-- The continuous query: vehicles over 120 km/h, with a derived flag.
-- Query it from psql: SELECT * FROM speeding LIMIT 5;
CREATE MATERIALIZED VIEW speeding WITH (retention = '1h') AS
SELECT vehicle_id,
       ts,
       speed_kmh,
       engine_temp,
       engine_temp > 110 AS overheating,
       upper(status) AS status
FROM vehicle_events
WHERE speed_kmh > 120;
