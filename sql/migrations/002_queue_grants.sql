-- The service role runs procrastinate's worker and defers jobs inside API transactions, so it
-- needs the whole of procrastinate's schema (installed by `iiq migrate` before this file).
GRANT USAGE ON SCHEMA procrastinate TO iiq_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA procrastinate TO iiq_service;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA procrastinate TO iiq_service;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA procrastinate TO iiq_service;
