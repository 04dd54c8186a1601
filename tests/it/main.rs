mod prepare;
