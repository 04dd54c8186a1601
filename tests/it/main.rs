mod forward;
