"""The local development stack: real Kafka, PostgreSQL, the CBT vSphere simulator and nbdkit,
installed and started by the project itself under one git-ignored state folder."""
