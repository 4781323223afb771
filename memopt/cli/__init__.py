"""The memopt command line."""
