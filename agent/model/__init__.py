"""What every part shares and drivers may import: the reading, the stream catalogue, time,
the chain, physical ranges and the settings every config model is built from."""
