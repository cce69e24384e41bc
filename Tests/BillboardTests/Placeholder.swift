// placeholder until the Billboard tests land
