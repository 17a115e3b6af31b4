"""Analytics: readings and waveforms in, power-quality metrics and alarms out."""
