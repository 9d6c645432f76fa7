"""Getting web data in safely: URL lists, URL safety, image guard and decode."""
