"""The P-Soups benchmark harness (``padlm eval``): generate, score, summarise, report."""
