"""The public gateway's logic: settings, the API contract's models and errors, auth, and the predict pipeline."""
