"""`make demo` (demo.py) and the toy task and tiny pre-trained Llama it trains (toymodel.py). Dev only."""
