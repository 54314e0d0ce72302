"""The op counter lives in the package (`vlmeff.opcount`) so that benchmarks print the same counts tests pin."""
from vlmeff.opcount import METADATA_OPS, OpCounter, count_ops, op_name

__all__ = ["METADATA_OPS", "OpCounter", "count_ops", "op_name"]
