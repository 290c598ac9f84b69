"""Configuration (typed dataclasses from YAML + overrides) and model resolution."""

from common.errors import ConfigError, UserError
from configs.loader import config_from_dict, load_config, save_config, to_dict
from configs.schema import Config

__all__ = ["Config", "ConfigError", "UserError", "config_from_dict", "load_config", "save_config", "to_dict"]
