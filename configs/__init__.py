"""ml_collections recipes, one file per recipe; each defines ``get_config()``."""
