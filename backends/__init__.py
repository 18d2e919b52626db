"""One module per privacy technique, each registered under the `suite.backends`
entry-point group. Modules import their heavy library lazily (inside methods), so
listing backends never needs the optional extras."""
