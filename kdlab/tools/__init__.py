"""Tools around the core: the benchmark yardstick, table reproduction and its reports, results tables, plots,
the demo and the document generator. The core (kdlab.config ... kdlab.train) never imports them."""
