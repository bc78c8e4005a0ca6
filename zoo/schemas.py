"""The tables of a zoo root and their base columns: one home for every layer's schema (models,
curves, checkpoints and tensors from generation; metrics, densities and cells from metrics/;
benchmark results; jobs and failures from the launcher). A `models` part adds one column per
hyperparameter of its zoo (zoo.rows); views union the parts by column name."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

SCHEMAS: dict[str, pa.Schema] = {
    "models": pa.schema(
        [
            ("model_id", pa.string()),
            ("zoo", pa.string()),
            ("arch", pa.string()),
            ("dataset", pa.string()),
            ("seed", pa.int64()),
            ("load_name", pa.string()),
            ("load", pa.float64()),
            ("temperature_name", pa.string()),
            ("temperature", pa.float64()),
            ("n_params", pa.int64()),
            ("status", pa.string()),
            ("train_seconds", pa.float64()),
            ("created_at", pa.timestamp("us", tz="UTC")),
            ("code_version", pa.string()),
            ("torch_version", pa.string()),
            ("config", pa.string()),
        ]
    ),
    "curves": pa.schema(
        [
            ("model_id", pa.string()),
            ("epoch", pa.int32()),
            ("train_loss", pa.float64()),
            ("train_acc", pa.float64()),
            ("test_loss", pa.float64()),
            ("test_acc", pa.float64()),
        ]
    ),
    "checkpoints": pa.schema(
        [
            ("model_id", pa.string()),
            ("epoch", pa.int32()),
            ("n_params", pa.int64()),
            ("n_values", pa.int64()),
            ("sha256", pa.string()),
            ("weights", pa.list_(pa.float32())),
        ]
    ),
    "tensors": pa.schema(
        [
            ("model_id", pa.string()),
            ("position", pa.int32()),
            ("name", pa.string()),
            ("shape", pa.list_(pa.int64())),
            ("offset", pa.int64()),
            ("numel", pa.int64()),
            ("dtype", pa.string()),
            ("kind", pa.string()),
        ]
    ),
    "metrics": pa.schema(
        [
            ("model_id", pa.string()),
            ("zoo", pa.string()),
            ("epoch", pa.int32()),
            ("family", pa.string()),
            ("name", pa.string()),
            ("value", pa.float64()),
            ("settings_hash", pa.string()),
            ("settings", pa.string()),
        ]
    ),
    "layer_metrics": pa.schema(
        [
            ("model_id", pa.string()),
            ("zoo", pa.string()),
            ("epoch", pa.int32()),
            ("family", pa.string()),
            ("layer", pa.string()),
            ("name", pa.string()),
            ("value", pa.float64()),
            ("settings_hash", pa.string()),
        ]
    ),
    "pair_metrics": pa.schema(
        [
            ("model_a", pa.string()),
            ("model_b", pa.string()),
            ("zoo", pa.string()),
            ("epoch", pa.int32()),
            ("family", pa.string()),
            ("name", pa.string()),
            ("value", pa.float64()),
            ("settings_hash", pa.string()),
            ("settings", pa.string()),
        ]
    ),
    "densities": pa.schema(
        [
            ("model_id", pa.string()),
            ("zoo", pa.string()),
            ("epoch", pa.int32()),
            ("split", pa.string()),
            ("eigenvalue", pa.float64()),
            ("weight", pa.float64()),
            ("settings_hash", pa.string()),
        ]
    ),
    "metric_failures": pa.schema(  # a metric unit (model or pair) whose family raised: recomputed next run
        [
            ("model_id", pa.string()),
            ("model_b", pa.string()),  # the pair's second model ("" for a model-level family)
            ("zoo", pa.string()),
            ("epoch", pa.int32()),
            ("family", pa.string()),
            ("error", pa.string()),
            ("settings_hash", pa.string()),
            ("failed_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    "cells": pa.schema(
        [
            ("zoo", pa.string()),
            ("epoch", pa.int32()),
            ("load_name", pa.string()),
            ("load", pa.float64()),
            ("temperature_name", pa.string()),
            ("temperature", pa.float64()),
            ("n_models", pa.int64()),
            ("n_pairs", pa.int64()),
            ("phase", pa.string()),
            ("phase_margin", pa.float64()),
            ("phase_agreement", pa.float64()),
            ("rules", pa.string()),
        ]
    ),
    "benchmark_results": pa.schema(
        [
            ("task", pa.string()),
            ("task_version", pa.int32()),
            ("method", pa.string()),
            ("parameters", pa.string()),  # JSON, the method's validated parameters
            ("parameters_hash", pa.string()),
            ("zoo", pa.string()),
            ("unit", pa.string()),  # a model id, "load=...,temperature=..." for a cell, or "population"
            ("load", pa.float64()),
            ("temperature", pa.float64()),
            ("phase", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("higher_is_better", pa.bool_()),
            ("status", pa.string()),  # ok | failed
            ("error", pa.string()),
            ("seed", pa.int64()),
            ("settings", pa.string()),  # JSON: the protocol's settings and the library versions
            ("code_version", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    "jobs": pa.schema(
        [
            ("model_id", pa.string()),
            ("zoo", pa.string()),
            ("job_id", pa.string()),
            ("executor", pa.string()),
            ("run", pa.string()),  # the launch that submitted it (one part per run)
            ("submitted_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    "failures": pa.schema(
        [
            ("model_id", pa.string()),
            ("zoo", pa.string()),
            ("error", pa.string()),
            ("job_id", pa.string()),
            ("failed_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
}


def empty_rows(table: str) -> pa.Table:
    """No rows of `table`, with its schema. (pyarrow's `Schema.empty_table` imports pandas, 0.6 s
    of every training job's start-up here; an empty list of batches does not.)"""
    return pa.Table.from_batches([], SCHEMAS[table])
