"""Every colour qkatlas draws with: AttentionViz's query green and key pink, their ramps for
binned modes, and the highlight colours. Thumbnails and the dashboard read them from here."""

QUERY_COLOUR = "#5fb96c"  # rgb(95, 185, 108)
KEY_COLOUR = "#e3378f"  # rgb(227, 55, 143)
QUERY_RAMP = ["#d9f0d3", "#aedea7", "#7fc97f", "#5fb96c", "#3d9a4f", "#238443", "#006837", "#00441b"]
KEY_RAMP = ["#fde0ef", "#fbb4d9", "#f38fc1", "#e3378f", "#c51b7d", "#a3135f", "#8e0152", "#5c0035"]
VIRIDIS = ["#440154", "#46327e", "#365c8d", "#277f8e", "#1fa187", "#4ac16d", "#a0da39", "#fde725"]
SEARCH_COLOUR = "#ff7f00"
SELECTED_COLOUR = "#1f3fff"
MOD5_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
