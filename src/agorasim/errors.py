class UserInputError(ValueError):
    """Bad input a user can give (scenario, config key, value, data file); the CLI prints its message on one line and exits with status 2."""
