"""Pipeline stages: one module per stage, plain typed functions plus thin Prefect tasks."""
