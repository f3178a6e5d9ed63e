"""Scrapes a Prometheus endpoint over HTTP and parses it with the official client's parser.

Usage: scrape_metrics.py URL  -> prints JSON: {"families": {name: {"type": t, "samples": [[name, labels, value], ...]}}}
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    assert r.status == 200, r.status
    text = r.read().decode()
families = {}
for f in text_string_to_metric_families(text):
    families[f.name] = {"type": f.type, "help": f.documentation, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps({"families": families}))
