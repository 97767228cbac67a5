from configs.config_parser import Config, ConfigError, load_config, save_config

__all__ = ["Config", "ConfigError", "load_config", "save_config"]
