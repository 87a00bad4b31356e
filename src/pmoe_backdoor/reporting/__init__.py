"""The study's tables and figures (``summaries``, ``figures``, ``blindspot``, ``compression``), table formats
(``tables``) and the config page (``configpage``)."""
