"""Configuration: Capacitor-compatible config.yml / nodes.yml loaded into frozen values."""

from capacitor_trio.config.load import ConfigError, ensure_data_dir, load_settings
from capacitor_trio.config.models import (
    ApiConfig,
    ChaosConfig,
    Config,
    Node,
    NodeSettings,
    Settings,
    effective,
)

__all__ = [
    "ApiConfig",
    "ChaosConfig",
    "Config",
    "ConfigError",
    "Node",
    "NodeSettings",
    "Settings",
    "effective",
    "ensure_data_dir",
    "load_settings",
]
