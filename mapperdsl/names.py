"""Names of the job-log tables mapperdsl keeps in the target database."""

PREFIX = "mapperdsl_"
JOBS = PREFIX + "jobs"
CHUNKS = PREFIX + "chunks"
CHECKPOINTS = PREFIX + "checkpoints"
REJECTS = PREFIX + "rejects"
