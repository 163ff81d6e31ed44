-- Version 3: who copied. External copiers (the seed's migratekit forks) store their change IDs
-- through the API; their commits are audited like cbtstream's, with their own job id.
ALTER TABLE replication_jobs
    ADD COLUMN origin        text NOT NULL DEFAULT 'cbtstream',
    ADD COLUMN origin_job_id text,
    ADD COLUMN origin_client text;
ALTER TABLE cbt_history
    ADD COLUMN origin        text NOT NULL DEFAULT 'cbtstream',
    ADD COLUMN origin_job_id text;
CREATE INDEX replication_jobs_origin_job_idx ON replication_jobs (origin_job_id)
    WHERE origin_job_id IS NOT NULL;
