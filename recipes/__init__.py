"""The shipped recipes, installed as package data (``compress.bundled_recipes``): `compress ls` lists them."""
