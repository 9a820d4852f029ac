"""Built-in models. Importing this package registers them."""
