"""Running a recipe: the recipe model, the runner, resource fitting and `capfilt status`."""
