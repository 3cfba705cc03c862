"""The SQLite store-and-forward buffer: nothing leaves it before the broker has it."""
