"""The operator's console: a live web page of the site, served by ``pfmon console``."""
