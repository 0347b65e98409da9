"""Moved to control/ (issue 17): the backend to control/ray_backend.py, `ServeConfig` to
control/config.py. This name stays only for bench/load_bench.py and bench/jct_sweep.py, which
import ServeConfig from here; delete it once they import zipserve.control.config."""

from zipserve.control.config import ServeConfig, served_name

__all__ = ["ServeConfig", "served_name"]
