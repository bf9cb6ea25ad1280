"""The HTML report: data gathering (summary, features), rendering (render, templates/) and the stage."""
